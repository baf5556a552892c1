"""tools/bench_startup.py: one start of this checkout, timed, with the log's figures read back."""

from __future__ import annotations

import pytest

from tools import bench_startup


@pytest.mark.slow
def test_one_run_times_ready_and_a_first_request_and_reads_the_start_up_log():
    r = bench_startup.one_run(bench_startup.REPO, [], timeout=180.0)
    assert 0 < r["ready_s"] < r["first_done_s"]
    assert r["first_request_s"] > 0 and r["first_text"]
    # The figures the server and its engine log: the table's columns depend on these lines.
    for key in ("model_load_s", "warmup_s", "ready_logged_s", "engine_ready_at_s"):
        assert r[key] > 0, key
    assert r["tokenizer_at_s"] > 0
    assert r["engine_ready_at_s"] <= r["ready_logged_s"]
    assert r["other_cpu_s"] >= 0


def test_medians_skip_runs_without_the_figure():
    runs = [{"ready_s": 3.0}, {"ready_s": 1.0, "warmup_s": 0.5}, {"ready_s": 2.0}]
    assert bench_startup._median(runs, "ready_s") == 2.0
    assert bench_startup._median(runs, "warmup_s") == 0.5
    assert bench_startup._median(runs, "tokenizer_at_s") is None
