"""Time per decode step with N structured requests: the grammar bitmask filled while the model
runs (the EngineCore's step) against filled after it (the forward joined first).

Both schedules run in one EngineCore on the default model, alternating step by step so that
the machine's noise falls on both alike; the fill's own time per step is printed beside them.

    python tools/bench_structured_step.py --quick        # 8 requests, 16 steps of each
    python tools/bench_structured_step.py --num-requests 32 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.config import EngineConfig  # noqa: E402
from engine_core.core import EngineCore  # noqa: E402
from engine_core.protocol import (  # noqa: E402
    EngineCoreRequest,
    SamplingParams,
    StructuredOutputsParams,
)

# Free strings and numbers: rows where the grammar allows much of the vocabulary.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "city": {"type": "string"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["name", "city", "notes", "score"],
}


def _step(core: EngineCore, overlap: bool) -> tuple[float, float]:
    """One step, the bitmask filled during (overlap) or after the forward: (step s, fill s)."""
    sched, ex = core.scheduler, core.executor
    so = sched.schedule()
    t0 = time.perf_counter()
    out = ex.execute_model(so)
    fill = 0.0
    if out is None:
        if not overlap:
            ex._forward.result()  # type: ignore[attr-defined]  # uniproc: join the forward
        t1 = time.perf_counter()
        grammar_output = sched.get_grammar_bitmask(so)
        fill = time.perf_counter() - t1
        out = ex.sample_tokens(grammar_output)
    took = time.perf_counter() - t0
    sched.update_from_output(so, out)
    return took, fill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="timed steps of each schedule")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 steps of each")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    n, steps = (8, 16) if args.quick else (args.num_requests, args.steps)
    core = EngineCore(EngineConfig(max_num_seqs=n, max_model_len=1024))
    try:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=2 * steps + 16,
            ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        )
        for i in range(n):
            prompt = [1, 504, 3458, 347, 4590, 42, 100 + i]
            core.add_request(EngineCoreRequest(f"r{i}", prompt, params))
        # Compile, admit and prefill: every request decoding before the timing starts.
        deadline = time.monotonic() + 120
        while len(core.scheduler.running) < n or any(
            r.num_output_tokens < 2 for r in core.scheduler.running
        ):
            core.step()
            if time.monotonic() > deadline:
                raise RuntimeError("the requests did not start decoding within 120 s")
        times: dict[bool, list[float]] = {True: [], False: []}
        fills: list[float] = []
        for _ in range(steps):
            for overlap in (True, False):
                took, fill = _step(core, overlap)
                times[overlap].append(took)
                fills.append(fill)
        during = statistics.median(times[True]) * 1e3
        after = statistics.median(times[False]) * 1e3
        fill_ms = statistics.median(fills) * 1e3
        result = {
            "num_requests": n,
            "steps_each": steps,
            "step_ms_fill_during_forward": round(during, 3),
            "step_ms_fill_after_forward": round(after, 3),
            "fill_ms": round(fill_ms, 3),
            "ratio_after_over_during": round(after / during, 3),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        core.shutdown()


if __name__ == "__main__":
    main()
