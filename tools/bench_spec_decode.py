"""Speculative decoding benchmark: no speculation, ngram and suffix on three workloads.

Each configuration runs alone (one engine at a time, in this process, greedy), on the
default model:
  (a) quote-edit: single streams whose output repeats text of their prompt: a proofreading
      edit of a news text (a_proofread) and a code edit (a_code_edit; the default 135M model
      rewrites the code rather than copying it, so little of it is drafted right);
  (b) agent-loop: 20 requests one after another whose outputs repeat earlier outputs
      (a tool-call JSON, the city changing; two example calls in the prompt);
  (c) batch32: bench_throughput.py's random batch32 workload (the off-switch's case).
It reports new tokens/s, mean acceptance length and the ratio to no speculation.

    python tools/bench_spec_decode.py --json out.json
    python tools/bench_spec_decode.py --quick      # a smoke run: tiny workloads
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_throughput import make_workload  # noqa: E402

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


def run_config(name: str, spec, loads, args) -> dict:
    from engine_core.config import EngineConfig
    from engine_core.core import EngineCore
    from engine_core.protocol import EngineCoreRequest, SamplingParams

    core = EngineCore(
        EngineConfig(
            dtype=args.dtype,
            speculative_config=spec,
            max_num_seqs=args.max_num_seqs,
            num_threads=args.num_threads,
        )
    )
    results = {}
    ids = iter(range(1 << 30))
    for wname, waves in loads.items():
        core.scheduler.reset_prefix_cache()
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
        results[wname] = {
            "new_tokens": new_tokens,
            "elapsed_s": round(elapsed, 3),
            "new_tok_per_s": round(new_tokens / elapsed, 2),
            "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
        }
        print(f"{name:7s} {wname:14s} {results[wname]}", flush=True)
    core.shutdown()
    del core
    gc.collect()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny workloads (a smoke run)")
    p.add_argument("--configs", default="none,ngram,suffix")
    p.add_argument("--workloads", default=None, help="a comma-separated subset (default: all)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
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
    results = {n: run_config(n, CONFIGS[n], loads, args) for n in names}
    if "none" in results:
        base = results["none"]
        for res in results.values():
            for w, r in res.items():
                r["ratio_to_none"] = round(r["new_tok_per_s"] / base[w]["new_tok_per_s"], 3)
    print("\nconfig  workload        tok/s    accept_len  ratio")
    for n, res in results.items():
        for w, r in res.items():
            print(
                f"{n:7s} {w:14s} {r['new_tok_per_s']:8.2f} {str(r['mean_acceptance_length']):>10s}"
                f"  {r.get('ratio_to_none', '-')}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "dtype": args.dtype, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
