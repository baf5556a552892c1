"""SpecDecodingCounter: what speculative decoding verified and accepted, for the stats and
the off-switch.

Torch-free (the scheduler side imports it).
"""

from __future__ import annotations

from engine_core.protocol import SchedulerStats
from engine_core.sched.request import Request


class SpecDecodingCounter:
    """Counts drafts verified and accepted (for SchedulerStats) and keeps each request's
    running acceptance (for the off-switch: Request.spec_accepted / spec_trials)."""

    # Older steps weigh less: a request's acceptance follows what its text does now.
    DECAY = 0.9

    def __init__(self) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos: list[int] = []
        # Never reset: the drafter's engine-wide acceptance reads their growth.
        self.total_accepted = 0
        self.total_trials = 0
        # Per draft position j (0-based): verifications that reached it, and that accepted it.
        self.position_trials: list[int] = []
        self.position_accepted: list[int] = []

    def observe(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """One request's verification: num_accepted of its num_drafts drafts were accepted."""
        if num_drafts <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafts:
            self.accepted_per_pos.extend([0] * (num_drafts - len(self.accepted_per_pos)))
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1
        # Geometric model: each draft is a trial until the first rejection.
        trials = num_accepted + (1 if num_accepted < num_drafts else 0)
        self.total_accepted += num_accepted
        self.total_trials += trials
        if len(self.position_trials) < trials:
            grow = trials - len(self.position_trials)
            self.position_trials.extend([0] * grow)
            self.position_accepted.extend([0] * grow)
        for j in range(trials):
            self.position_trials[j] += 1
        for j in range(num_accepted):
            self.position_accepted[j] += 1
        request.spec_accepted = request.spec_accepted * self.DECAY + num_accepted
        request.spec_trials = request.spec_trials * self.DECAY + trials
        request.spec_last_outcome = (num_drafts, num_accepted)

    def fill(self, stats: SchedulerStats, reset: bool) -> None:
        stats.spec_num_drafts = self.num_drafts
        stats.spec_num_draft_tokens = self.num_draft_tokens
        stats.spec_num_accepted_tokens = self.num_accepted_tokens
        stats.spec_num_accepted_tokens_per_pos = list(self.accepted_per_pos)
        if reset:
            self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
            self.accepted_per_pos = []
