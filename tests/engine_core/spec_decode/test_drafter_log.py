"""The periodic SpecDecoding log line: mean acceptance length and per-position rates."""

import logging

from engine_core.protocol import SchedulerStats
from engine_core.spec_decode import drafter as drafter_mod
from engine_core.spec_decode.config import SpeculativeConfig
from engine_core.spec_decode.ngram import NgramProposer


def test_the_log_line_reports_what_the_steps_accepted(monkeypatch, caplog):
    monkeypatch.setattr(drafter_mod, "_LOG_INTERVAL_S", 0.0)
    spec = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    d = drafter_mod.Drafter(spec, NgramProposer(3, 1, 3))
    with caplog.at_level(logging.INFO, logger="ringserve.spec_decode"):
        # Two requests verified 3 drafts each: one accepted 2, the other 1.
        d.record(
            SchedulerStats(
                spec_num_drafts=2,
                spec_num_draft_tokens=6,
                spec_num_accepted_tokens=3,
                spec_num_accepted_tokens_per_pos=[2, 1, 0],
            )
        )
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Mean acceptance length: 2.50" in line
    assert "Per-position acceptance rate: 1.000, 0.500, 0.000" in line
    assert "Accepted: 3 tokens, Drafted: 6 tokens" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ringserve.spec_decode"):
        d.record(SchedulerStats())  # nothing drafted since: no line
    assert caplog.records == []
