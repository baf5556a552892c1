"""Speculative decoding benchmark: no speculation, ngram and suffix on three workloads.

Each configuration runs alone (one engine stepping at a time, in this process, greedy), on the
default model:
  (a) quote-edit: single streams whose output repeats text of their prompt: a proofreading
      edit of a news text (a_proofread) and a code edit (a_code_edit; the default 135M model
      rewrites the code rather than copying it, so little of it is drafted right);
  (b) agent-loop: 20 requests one after another whose outputs repeat earlier outputs
      (a tool-call JSON, the city changing; two example calls in the prompt);
  (c) batch32: bench_throughput.py's random batch32 workload (the off-switch's case).
It reports new tokens/s, mean acceptance length and the ratio to no speculation, and the CPU
time other processes took meanwhile. The configurations take turns: every round runs each
workload under each configuration back to back (the order rotating by round), each run from a
cold drafter and an empty prefix cache, and the ratio reported is the median over rounds of
the ratio within a round. A 2-core VM's speed drifts by 20% and more within minutes; runs of
a configuration minutes apart measured that drift as much as the configuration.

    python tools/bench_spec_decode.py --json out.json
    python tools/bench_spec_decode.py --quick      # a smoke run: tiny workloads
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_throughput import make_workload  # noqa: E402
from tools.cpu_noise import CpuNoise  # noqa: E402

CONFIGS = {
    "none": None,
    "ngram": {
        "method": "ngram",
        "num_speculative_tokens": 5,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 4,
    },
    "suffix": {"method": "suffix"},
}

_CODE = """def parse_records(lines):
    records = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, value = line.split("=", 1)
        records.append((name.strip(), value.strip()))
    return records


def format_records(records):
    out = []
    for name, value in records:
        out.append(f"{name} = {value}")
    return "\\n".join(out)
"""
_QUOTE_EDIT = (
    "<|im_start|>user\nHere is some Python code:\n\n" + _CODE + "\nRewrite the whole code "
    "with the function parse_records renamed to read_records. Output only the code."
    "<|im_end|>\n<|im_start|>assistant\n"
)
_NEWS = (
    "The city council met on Tuesday evening to discuss the new budgett for next year. The "
    "mayor said that the budget would increase spending on schools and roads, and that "
    "property taxes would not rise. Several council members asked how the new bus line to the "
    "airport would be paid for. The finance director answered that a federal grant would cover "
    "most of the cost, and that the rest would come from higher parking fees in the city "
    "centre. A group of residants from the north side of the city spoke against the plan to "
    "close the public libary on Sundays. They said that many students use the library to study "
    "at the weekend, and that the savings would be small. The council agreed to look at the "
    "library hours again at its next meeting in March. The meeting ended with a vote on the new "
    "park by the river, which passed by seven votes to two. Work on the park is expected to "
    "start in the spring and to be finished before the end of the summer. The mayor thanked the "
    "volunteers who had cleaned the river banks last month, and said that the city would plant "
    "two hundred new trees along the water. A local business owner asked whether the road "
    "works on the main street could be moved to the night, because the noise and the closed "
    "lanes had kept customers away for weeks. The director of public works promised to look "
    "into it and to report back to the council before the end of the month."
)
_PROOFREAD = (
    "<|im_start|>user\nCorrect the spelling mistakes in the following text and output the "
    "corrected text in full:\n\n" + _NEWS + "<|im_end|>\n<|im_start|>assistant\n"
)
_CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon",
    "Prague", "Dublin", "Warsaw", "Athens", "Cairo", "Lima", "Quito", "Seoul", "Delhi",
    "Sydney", "Toronto",
]  # fmt: skip


def _tool_call(city: str) -> str:
    args = {"city": city, "unit": "celsius", "days": 3, "fields": ["temperature", "rain", "wind"]}
    return json.dumps({"name": "get_weather", "arguments": args})


def _agent_turn(city: str, answered: bool) -> str:
    turn = (
        f"<|im_start|>user\nWhat is the weather in {city} for the next three days?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return turn + (_tool_call(city) + "<|im_end|>\n" if answered else "")


# An agent's prompt: the tool's format and two earlier exchanges (few-shot: the 135M default
# model answers in prose without them), then the new question. Every answer is the same JSON
# call with another city: what suffix decoding's tree over earlier outputs predicts.
_AGENT = (
    "<|im_start|>system\nYou are a weather agent. For every question, answer with exactly one "
    'JSON tool call and nothing else, of the form {"name": "get_weather", "arguments": {...}}.'
    "<|im_end|>\n" + _agent_turn("Nairobi", True) + _agent_turn("Havana", True) + "{question}"
)


def workloads(tokenizer, vocab_size: int, quick: bool) -> dict[str, list[list[tuple]]]:
    """name -> waves: each wave a list of (prompt ids, max new tokens) run together."""
    a1 = [[(tokenizer.encode(_PROOFREAD), 24 if quick else 256)]]
    a2 = [[(tokenizer.encode(_QUOTE_EDIT), 24 if quick else 256)]]
    cities = _CITIES[:3] if quick else _CITIES
    b = [
        [
            (
                tokenizer.encode(_AGENT.replace("{question}", _agent_turn(c, False))),
                16 if quick else 64,
            )
        ]
        for c in cities
    ]
    batch = make_workload("tiny" if quick else "batch32", vocab_size, seed=0)
    c = [[(p, n) for p, n in batch]]
    return {"a_proofread": a1, "a_code_edit": a2, "b_agent_loop": b, "c_batch32": c}


def make_core(spec, args):
    from engine_core.config import EngineConfig
    from engine_core.core import EngineCore

    return EngineCore(
        EngineConfig(
            dtype=args.dtype,
            speculative_config=spec,
            max_num_seqs=args.max_num_seqs,
            num_threads=args.num_threads,
        )
    )


def run_workload(core, waves, ids) -> dict:
    """One workload on one engine, from a cold drafter and an empty prefix cache."""
    from engine_core.protocol import EngineCoreRequest, SamplingParams
    from engine_core.spec_decode import make_drafter
    from engine_core.spec_decode.stats import SpecDecodingCounter

    core.scheduler.reset_prefix_cache()
    core.scheduler.spec.counter = SpecDecodingCounter()
    core.drafter = make_drafter(core.config)  # an empty suffix tree: no earlier round's outputs
    new_tokens = drafts = accepted = 0
    elapsed = 0.0
    for wave in waves:
        for prompt, n in wave:
            params = SamplingParams(temperature=0.0, max_tokens=n)
            core.add_request(EngineCoreRequest(str(next(ids)), prompt, params))
        t0 = time.perf_counter()
        while core.has_work():
            out = core.step()
            new_tokens += sum(len(o.new_token_ids) for o in out.outputs)
            drafts += out.scheduler_stats.spec_num_drafts
            accepted += out.scheduler_stats.spec_num_accepted_tokens
        elapsed += time.perf_counter() - t0
    return {"new_tokens": new_tokens, "elapsed_s": elapsed, "drafts": drafts, "accepted": accepted}


def summarize(runs: list[dict], base: list[dict] | None) -> dict:
    rates = [r["new_tokens"] / r["elapsed_s"] for r in runs]
    drafts = sum(r["drafts"] for r in runs)
    out = {
        "new_tokens": runs[0]["new_tokens"],
        "elapsed_s": round(statistics.median(r["elapsed_s"] for r in runs), 3),
        "new_tok_per_s": round(statistics.median(rates), 2),
        "rounds_tok_per_s": [round(x, 2) for x in rates],
        "mean_acceptance_length": (
            round(1 + sum(r["accepted"] for r in runs) / drafts, 3) if drafts else None
        ),
    }
    if base is not None:
        ratios = [x / (b["new_tokens"] / b["elapsed_s"]) for x, b in zip(rates, base, strict=True)]
        out["ratio_to_none"] = round(statistics.median(ratios), 3)
        out["rounds_ratio"] = [round(x, 3) for x in ratios]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny workloads (a smoke run)")
    p.add_argument("--configs", default="none,ngram,suffix")
    p.add_argument("--workloads", default=None, help="a comma-separated subset (default: all)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of turns (--quick: 1)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    from frontend.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    loads = workloads(tokenizer, len(tokenizer), args.quick)
    if args.workloads:
        wanted = args.workloads.split(",")
        if unknown_w := [w for w in wanted if w not in loads]:
            p.error(f"unknown workload {unknown_w[0]!r} (known: {', '.join(loads)})")
        loads = {w: loads[w] for w in wanted}
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r} (known: {', '.join(CONFIGS)})")
    rounds = 1 if args.quick else args.rounds
    cores = {n: make_core(CONFIGS[n], args) for n in names}
    runs: dict[str, dict[str, list[dict]]] = {n: {w: [] for w in loads} for n in names}
    ids = iter(range(1 << 30))
    with CpuNoise() as noise:
        for r in range(rounds):
            for w, waves in loads.items():
                for i in range(len(names)):
                    n = names[(i + r) % len(names)]
                    res = run_workload(cores[n], waves, ids)
                    runs[n][w].append(res)
                    rate = res["new_tokens"] / res["elapsed_s"]
                    print(f"round {r + 1}/{rounds} {n:7s} {w:14s} {rate:8.2f} tok/s", flush=True)
    for core in cores.values():
        core.shutdown()
    del cores
    gc.collect()
    results = {
        n: {w: summarize(runs[n][w], runs["none"][w] if "none" in runs else None) for w in loads}
        for n in names
    }
    print("\nconfig  workload        tok/s    accept_len  ratio (median of the rounds' ratios)")
    for n, res in results.items():
        for w, r in res.items():
            print(
                f"{n:7s} {w:14s} {r['new_tok_per_s']:8.2f} {str(r['mean_acceptance_length']):>10s}"
                f"  {r.get('ratio_to_none', '-')}  rounds {r.get('rounds_ratio', '-')}"
            )
    print(noise.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "quick": args.quick,
                    "dtype": args.dtype,
                    "rounds": rounds,
                    "other_cpu_s": round(noise.other_cpu_s, 2),
                    "wall_s": round(noise.wall_s, 1),
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
