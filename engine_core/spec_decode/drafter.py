"""Drafter: after each step, decides which running requests get drafts and proposes them.

Runs in the EngineCore process, on the scheduler's requests (torch-free). Only a request
that is decoding (its last sampled token is its only uncomputed one) gets drafts; one still
in prefill does not. How many each gets is the off-switch's call (switch.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from engine_core.protocol import FinishReason, SchedulerStats
from engine_core.sched.request import Request
from engine_core.sched.scheduler import Scheduler
from engine_core.spec_decode.config import SpeculativeConfig
from engine_core.spec_decode.switch import (
    EngineAcceptance,
    PositionAcceptance,
    ProbabilityCalibration,
    StepCostModel,
    choose_from_gains,
    request_alpha,
)

logger = logging.getLogger("ringserve.spec_decode")

_LOG_INTERVAL_S = 10.0


class Proposer(Protocol):
    def propose(self, request: Request, max_drafts: int) -> list[int]: ...

    def finish(self, request: Request, completed: bool) -> None: ...


class Drafter:
    """The proposer, the off-switch and the acceptance log of one engine."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.cost = StepCostModel()
        self.acceptance = EngineAcceptance()
        self.positions = PositionAcceptance()
        self.calibration = ProbabilityCalibration()
        # A proposer that knows its drafts' probabilities (suffix: the tree's frequencies).
        self._scored: Callable[[Request, int], tuple[list[int], list[float]]] | None = getattr(
            proposer, "propose_with_probs", None
        )
        # Request id -> the conditional probabilities of the drafts it was given last.
        self._pending_probs: dict[str, list[float]] = {}
        self._tracked: dict[str, Request] = {}
        self._log_totals = [0, 0, 0]  # drafts, draft tokens, accepted tokens
        self._log_per_pos: list[int] = []
        self._last_log = time.monotonic()
        self._seen = (0, 0)  # the scheduler counter's (total_accepted, total_trials) last read
        self._step_decoded = False  # the step being observed only decoded

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One executed step (proposed after): its scheduled tokens and wall time.

        Only decode steps are the cost model's data: drafts are added to decode steps, and a
        prefill chunk's many rows cost far less each (a different GEMM), so a prefill step's
        leverage in the fit would make drafts look several times cheaper than they are.
        """
        if num_tokens > 0 and self._step_decoded:
            self.cost.observe(num_tokens, seconds)

    def propose(self, scheduler: Scheduler) -> None:
        """Attach drafts to the running requests that should verify some next step."""
        self._calibrate()
        self._forget_gone(scheduler)
        self._step_decoded = scheduler.spec.last_step_decoded
        counter = scheduler.spec.counter
        acc, trials = counter.total_accepted, counter.total_trials
        if trials > self._seen[1]:
            self.acceptance.observe(acc - self._seen[0], trials - self._seen[1])
        else:
            self.acceptance.relax()
        self._seen = (acc, trials)
        if self._scored is None:  # a scored proposer's rates are kept by _calibrate
            self.positions.observe(counter.position_trials, counter.position_accepted)
        running = scheduler.running
        # Structured requests draft too: the EngineCore cuts their drafts where the grammar
        # refuses one, and their bitmask has a row per draft position.
        decoding = [
            r for r in running if not r.is_finished and r.num_tokens - r.num_computed_tokens == 1
        ]
        for r in running:
            r.spec_token_ids = []
            self._tracked[r.request_id] = r
        limit = self.config.disable_by_batch_size
        if not decoding or (limit is not None and len(running) >= limit):
            return
        k = self.config.num_speculative_tokens
        max_len = scheduler.max_model_len
        max_drafts = []
        for r in decoding:
            m = min(k, max_len - r.num_tokens)
            if r.sampling_params.max_tokens is not None:
                m = min(m, r.sampling_params.max_tokens - r.num_output_tokens - 1)
            max_drafts.append(max(m, 0))
        engine_alpha = self.acceptance.alpha
        alphas = [request_alpha(r.spec_accepted, r.spec_trials, engine_alpha) for r in decoding]
        num_tokens = sum(r.num_tokens - r.num_computed_tokens for r in running)
        num_tokens += sum(r.num_tokens - r.num_computed_tokens for r in scheduler.waiting)
        budget = scheduler.max_num_batched_tokens
        num_tokens = min(num_tokens, budget)
        slope = self.cost.slope_ratio()
        first = [
            self.positions.gains(a, m, engine_alpha) if a > 0 else []
            for a, m in zip(alphas, max_drafts, strict=True)
        ]
        chosen = choose_from_gains(first, num_tokens, budget - num_tokens, slope)
        if self._scored is None:
            for r, n in zip(decoding, chosen, strict=True):
                if n > 0:
                    r.spec_token_ids = self.proposer.propose(r, n)
        else:
            # A proposer that knows each draft's probability (suffix: the tree's path
            # frequency) gets a second pass: the geometric estimate alone sees a request whose
            # drafts are right up to a branch (an agent's JSON up to the argument that
            # changes) as accepting ~all drafts, and verifies long drafts past the branch that
            # are then thrown away. Its gains times the tree's p_j, the same choice on those.
            # The tree's probabilities are calibrated first against what verification
            # accepted at such probabilities (switch.ProbabilityCalibration).
            drafts: list[list[int]] = []
            gains: list[list[float]] = []
            conditional: dict[str, list[float]] = {}
            for r, n, g in zip(decoding, chosen, first, strict=True):
                tokens, probs = self._scored(r, n) if n > 0 else ([], [])
                drafts.append(tokens)
                prev = [1.0, *probs][: len(probs)]
                qs = [p / q if q > 0 else 0.0 for p, q in zip(probs, prev, strict=True)]
                conditional[r.request_id] = qs
                calibrated = self.calibration.path(qs)
                gains.append([gj * p for gj, p in zip(g, calibrated, strict=False)])
            kept = choose_from_gains(gains, num_tokens, budget - num_tokens, slope)
            for r, tokens, n in zip(decoding, drafts, kept, strict=True):
                r.spec_token_ids = tokens[:n]
                if n:
                    self._pending_probs[r.request_id] = conditional[r.request_id][:n]
        for r in decoding:
            if not r.spec_token_ids:
                # Not verified this step: its estimate drifts back to the engine's, so that
                # a request whose drafts failed once gets another chance later.
                r.spec_accepted *= 0.95
                r.spec_trials *= 0.95

    def record(self, stats: SchedulerStats) -> None:
        """One step's stats, for the periodic log line."""
        if stats.spec_num_drafts == 0:
            self._maybe_log()
            return
        accepted = stats.spec_num_accepted_tokens
        t = self._log_totals
        t[0] += stats.spec_num_drafts
        t[1] += stats.spec_num_draft_tokens
        t[2] += accepted
        per_pos = stats.spec_num_accepted_tokens_per_pos
        if len(self._log_per_pos) < len(per_pos):
            self._log_per_pos.extend([0] * (len(per_pos) - len(self._log_per_pos)))
        for j, a in enumerate(per_pos):
            self._log_per_pos[j] += a
        self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < _LOG_INTERVAL_S or self._log_totals[0] == 0:
            return
        drafts, draft_tokens, accepted = self._log_totals
        rates = ", ".join(f"{a / drafts:.3f}" for a in self._log_per_pos)
        logger.info(
            "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f "
            "tokens/s, Drafted throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d "
            "tokens, Per-position acceptance rate: %s, Avg Draft acceptance rate: %.1f%%",
            1 + accepted / drafts,
            accepted / (now - self._last_log),
            draft_tokens / (now - self._last_log),
            accepted,
            draft_tokens,
            rates,
            100 * accepted / max(draft_tokens, 1),
        )
        self._log_totals = [0, 0, 0]
        self._log_per_pos = []
        self._last_log = now

    def _calibrate(self) -> None:
        """What the last step's verifications accepted of drafts with known probabilities.

        A draft at a branch (q < 1) goes to the calibration of its q; a sure one to the rate
        of its position. Each rejection is then counted once: were the branch's rejections
        also in the per-position rates (as the counter's totals have them), a draft past a
        branch would pay for it twice, in its position's rate and in the calibrated q.
        """
        sure = ProbabilityCalibration.SURE
        trials: list[int] = []
        accepted: list[int] = []
        for req_id, qs in self._pending_probs.items():
            request = self._tracked.get(req_id)
            if request is None or request.spec_last_outcome is None:
                continue
            num_verified, num_accepted = request.spec_last_outcome
            request.spec_last_outcome = None
            self.calibration.observe(qs, num_verified, num_accepted)
            tried = min(num_verified, num_accepted + 1, len(qs))  # up to the first rejection
            if len(trials) < tried:
                trials.extend([0] * (tried - len(trials)))
                accepted.extend([0] * (tried - len(accepted)))
            for j in range(tried):
                if qs[j] >= sure:
                    trials[j] += 1
                    accepted[j] += j < num_accepted
        self._pending_probs.clear()
        if trials:
            self.positions.add(trials, accepted)

    def _forget_gone(self, scheduler: Scheduler) -> None:
        for req_id in [r for r in self._tracked if r not in scheduler.requests]:
            request = self._tracked.pop(req_id)
            completed = request.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
            self.proposer.finish(request, completed)
