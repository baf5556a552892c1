"""tools/gpu_check.sh: its dry run rehearses every step on this CPU; its report's bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine_core.config import EngineConfig
from frontend.__main__ import served_model
from tools import bench_serving, gpu_check_report
from tools.gpu_check_report import STEPS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", SCRIPT, "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return proc, out, summary


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dry_run_gives_every_step_a_status_and_skips_only_what_needs_a_gpu(dry_run):
    proc, out, summary = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == list(STEPS)
    log = (out / "log.txt").read_text()
    for name, step in steps.items():
        assert step["status"] in ("ok", "failed", "timeout", "skipped"), step
        expected = "skipped" if name == "cuda_tests" else "ok"
        assert step["status"] == expected, (step, log[-4000:])
    assert "need a GPU" in steps["cuda_tests"]["note"]
    assert "nvidia-smi not run" in steps["env"]["note"]
    assert summary["mode"] == "dry-run" and summary["env"]["cuda_available"] is False
    assert summary["env"]["nvrtc"]  # NVRTC loads without a GPU: its version is reported
    # The stdout tail ends with the text summary, which names every step.
    assert (out / "summary.txt").read_text() in proc.stdout
    for name in STEPS:
        assert name in (out / "summary.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dry_run_measures_each_benchmark_step_on_the_tiny_shape(dry_run):
    _, out, summary = dry_run
    decode = summary["decode_1b"]
    assert {(r["mode"], r["batch"]) for r in decode["rows"]} == {
        (m, b) for m in ("graphs", "eager") for b in (1, 2)
    }
    assert all(r["config"] == "tiny-llama" and r["pct_of_floor"] > 0 for r in decode["rows"])
    engines = {(r["engine"], r.get("batch")) for r in summary["e2e_1b"]["throughput"]}
    assert engines == {(e, b) for e in ("ringserve", "hf-generate", "hf-generate-batch")
                       for b in (1, 2)}  # fmt: skip
    serving = summary["serving_1b"]
    assert [r["concurrency"] for r in serving] == [1, 2, 4]
    for r in serving:
        assert r["completed"] == 2 * r["concurrency"] and r["failed"] == 0, r
        assert r["total_output_tokens"] == 8 * r["completed"]
        assert r["output_throughput"] > 0 and r["median_ttft_ms"] > 0 and r["median_itl_ms"] > 0
    assert {(r["mode"], r["batch"]) for r in summary["decode_8b"]["rows"]} == {
        ("graphs", 1),
        ("graphs", 2),
    }
    assert [t["met"] for t in summary["targets"]] == [None, None]  # nothing on a GPU here
    # What a device call brings back: at most 8 plain files, no folders.
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files


def test_report_marks_steps_the_run_never_reached(tmp_path):
    (tmp_path / "steps.tsv").write_text("install\tok\t0\t1.5\t60\t\nenv\ttimeout\t124\t60\t60\tx\n")
    rows = gpu_check_report.read_steps(str(tmp_path))
    assert [r["step"] for r in rows] == list(STEPS)
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "timeout"
    assert all(r["status"] == "skipped" and "not reached" in r["note"] for r in rows[2:])
    summary = gpu_check_report.write_report(str(tmp_path), str(tmp_path / "out"), "full")
    assert summary["pytest"] is None and summary["decode_1b"] is None
    assert "not reached" in (tmp_path / "out" / "summary.txt").read_text()


def test_targets_are_read_off_the_graphs_row_and_the_generate_batch_ratio():
    decode = {"rows": [{"mode": "graphs", "batch": 1, "cuda_graphs": True, "pct_of_floor": 85.0}]}
    e2e = {"ratios": [{"versus": "hf-generate-batch", "batch": 64, "ratio": 2.5}]}
    floor, ratio = gpu_check_report.check_targets(decode, e2e)
    assert (floor["measured"], floor["met"]) == (85.0, True)
    assert (ratio["measured"], ratio["met"]) == (2.5, False)
    # A graphs row that ran eagerly (no CUDA graphs captured) does not count.
    decode["rows"][0]["cuda_graphs"] = False
    assert gpu_check_report.check_targets(decode, None)[0]["met"] is None


def test_only_wheels_of_packages_not_installed_are_picked(tmp_path):
    for name in ("pytest-9.2.0-py3-none-any.whl", "no_such_dist_xyz-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert gpu_check_report.missing_wheels(str(tmp_path)) == ["no-such-dist-xyz"]


def test_a_dummy_model_from_hf_config_is_served_under_the_configs_name(tmp_path):
    path = os.path.join(REPO, "tools", "configs", "tiny-llama.json")
    config = EngineConfig(load_format="dummy", hf_config=path)
    assert served_model(config) == ("tiny-llama", path)
    (tmp_path / "my-model").mkdir()
    cfg = tmp_path / "my-model" / "config.json"
    cfg.write_text(open(path).read())
    assert served_model(EngineConfig(load_format="dummy", hf_config=str(cfg)))[0] == "my-model"


def test_random_token_prompts_stay_below_max_token_id():
    args = bench_serving.parse_args(["--num-prompts", "20", "--max-token-id", "300"])
    ids = [t for r in bench_serving.make_requests(args) for t in r.prompt]
    assert len(ids) == 20 * 128 and max(ids) < 300 and min(ids) >= 100
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--max-token-id", "50"])
