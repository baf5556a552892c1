"""tools/bench_spec_decode.py: the configurations' turns and what the JSON reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools import bench_spec_decode


def test_the_ratio_is_the_median_of_each_rounds_own_ratio():
    base = [{"new_tokens": 100, "elapsed_s": 1.0}, {"new_tokens": 100, "elapsed_s": 2.0}]
    # Round 2 ran on a machine twice as slow for both: its ratio is still 2.
    runs = [
        {"new_tokens": 100, "elapsed_s": 0.5, "drafts": 10, "accepted": 30},
        {"new_tokens": 100, "elapsed_s": 1.0, "drafts": 10, "accepted": 20},
    ]
    r = bench_spec_decode.summarize(runs, base)
    assert r["rounds_ratio"] == [2.0, 2.0] and r["ratio_to_none"] == 2.0
    assert r["mean_acceptance_length"] == 3.5  # 1 + 50 accepted / 20 verifications
    assert r["rounds_tok_per_s"] == [200.0, 100.0]


@pytest.mark.slow
def test_a_quick_run_reports_every_config_and_speculation_leaves_the_outputs_alone(tmp_path):
    out = tmp_path / "spec.json"
    cmd = [sys.executable, "tools/bench_spec_decode.py", "--quick", "--json", str(out)]
    cmd += ["--workloads", "a_proofread,b_agent_loop", "--configs", "none,ngram,suffix"]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    assert report["rounds"] == 1 and report["other_cpu_s"] >= 0
    results = report["results"]
    for w in ("a_proofread", "b_agent_loop"):
        # Greedy: every configuration emits the same tokens, so the same number of them.
        assert len({results[n][w]["new_tokens"] for n in results}) == 1
        assert results["none"][w]["ratio_to_none"] == 1.0
    assert results["suffix"]["b_agent_loop"]["mean_acceptance_length"] > 1.0
