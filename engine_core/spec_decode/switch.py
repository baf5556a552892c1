"""The per-step off-switch: drafts only where the step's expected throughput gains from them.

The rule. A step's time (scheduling, forward, sampling and proposing) is modelled as t(N) =
a + b * N for N scheduled tokens, fitted online to the engine's own decode steps
(exponentially weighted least squares; until the steps seen spread enough in N, b / a = 1 /
64; prefill steps are left out, see Drafter.observe_step). A request with running acceptance
alpha (the per-draft acceptance of its recent verifications, geometric model, with a prior
of the engine-wide average) gains prod_{i<=j} min(alpha, rate_i) expected tokens from its
j-th draft, rate_i the engine-wide acceptance of position i given the ones before it
(PositionAcceptance); a proposer that knows its drafts' probabilities (suffix: the tree's
path frequencies) has each gain multiplied by that and the choice made again. Starting
from the step without drafts (B decoding requests, N0 tokens: B emitted tokens in t(N0)),
drafts are added in order of decreasing gain, and the step takes the prefix that maximises
expected tokens per second, (B + sum of gains) / t(N0 + drafts), within the token budget. A
draft is therefore kept only while its gain beats the throughput it costs: at a small batch
(t dominated by a) nearly any draft pays; at a large batch (b * N comparable to a) only
drafts that are almost always accepted do; when none pays, the step has no drafts and the
proposer does not even run. `disable_by_batch_size` (vLLM's key) turns drafts off at that
many running requests regardless.
"""

from __future__ import annotations

from bisect import bisect_right

_PRIOR_SLOPE_RATIO = 1.0 / 64  # b / a before the engine has measured itself
_PRIOR_ALPHA = 0.3  # cautious: a batch drafts at first only where acceptance proves high
_PRIOR_WEIGHT = 2.0  # pseudo-trials of the engine-wide acceptance in each request's estimate


class StepCostModel:
    """t(N) = a + b * N, fitted to (scheduled tokens, seconds) of recent steps."""

    DECAY = 0.995

    def __init__(self) -> None:
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, num_tokens: int, seconds: float) -> None:
        d = self.DECAY
        n = float(num_tokens)
        self._w = self._w * d + 1.0
        self._n = self._n * d + n
        self._t = self._t * d + seconds
        self._nn = self._nn * d + n * n
        self._nt = self._nt * d + n * seconds

    def slope_ratio(self) -> float:
        """b / a: how much one more token costs relative to a step's fixed cost."""
        if self._w < 4:
            return _PRIOR_SLOPE_RATIO
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n < 1.0:  # the steps seen do not tell a from b
            return _PRIOR_SLOPE_RATIO
        b = (self._nt / self._w - mean_n * mean_t) / var_n
        a = mean_t - b * mean_n
        if b <= 0:
            return 1e-6
        if a <= 0:
            return 1e3
        return b / a


def choose_drafts(
    alphas: list[float], max_drafts: list[int], num_tokens: int, budget: int, slope_ratio: float
) -> list[int]:
    """How many drafts each decoding request gets (see the module docstring).

    alphas[i], max_drafts[i]: request i's acceptance estimate and draft limit; num_tokens: the
    step's tokens without drafts; budget: how many draft tokens the step can still take.
    """
    gains = [
        [alpha**j for j in range(1, k + 1)] if alpha > 0 else []
        for alpha, k in zip(alphas, max_drafts, strict=True)
    ]
    return choose_from_gains(gains, num_tokens, budget, slope_ratio)


def choose_from_gains(
    gains: list[list[float]], num_tokens: int, budget: int, slope_ratio: float
) -> list[int]:
    """choose_drafts on explicit expected gains: gains[i][j], the probability that request
    i's draft j + 1 is accepted (non-increasing in j); returns how many of each to keep."""
    ranked = [(g, i) for i, row in enumerate(gains) for g in row if g > 0]
    ranked.sort(key=lambda g: -g[0])  # stable: a request's drafts stay in their order
    chosen = [0] * len(gains)
    emitted = float(len(gains))
    best = emitted / (1.0 + slope_ratio * num_tokens)
    best_len = 0
    for m, (gain, _) in enumerate(ranked[: max(budget, 0)], start=1):
        emitted += gain
        rate = emitted / (1.0 + slope_ratio * (num_tokens + m))
        if rate > best:
            best, best_len = rate, m
    for _, i in ranked[:best_len]:
        chosen[i] += 1
    return chosen


def request_alpha(accepted: float, trials: float, engine_alpha: float) -> float:
    return (accepted + _PRIOR_WEIGHT * engine_alpha) / (trials + _PRIOR_WEIGHT)


class PositionAcceptance:
    """The engine-wide acceptance of the j-th draft given the ones before it were accepted.

    The geometric model assumes one rate at every position; drafts copied from earlier text
    are instead right up to where the text changes (an agent's JSON up to the argument that
    differs) and a run of verifications that all accepted their 3 drafts says little about
    the 12th. Measured per position (decayed counts, each with a prior of the engine's
    alpha), a draft's gain is the product over its positions of min(request alpha, rate).
    """

    DECAY = 0.99

    def __init__(self) -> None:
        self._trials: list[float] = []
        self._accepted: list[float] = []
        self._seen: tuple[list[int], list[int]] = ([], [])

    def observe(self, trials: list[int], accepted: list[int]) -> None:
        """The counter's never-reset per-position totals; the growth since last is new."""
        old_t, old_a = self._seen
        if trials == old_t:
            return
        self.add(
            [t - (old_t[j] if j < len(old_t) else 0) for j, t in enumerate(trials)],
            [a - (old_a[j] if j < len(old_a) else 0) for j, a in enumerate(accepted)],
        )
        self._seen = (list(trials), list(accepted))

    def add(self, trials: list[int], accepted: list[int]) -> None:
        """One step's new trials and acceptances per position (the counts decay first)."""
        if len(self._trials) < len(trials):
            self._trials.extend([0.0] * (len(trials) - len(self._trials)))
            self._accepted.extend([0.0] * (len(trials) - len(self._accepted)))
        for j, (t, a) in enumerate(zip(trials, accepted, strict=True)):
            self._trials[j] = self._trials[j] * self.DECAY + t
            self._accepted[j] = self._accepted[j] * self.DECAY + a

    def gains(self, alpha: float, k: int, engine_alpha: float) -> list[float]:
        """Expected acceptance of drafts 1..k of a request whose own estimate is alpha."""
        out: list[float] = []
        g = 1.0
        for j in range(k):
            if j < len(self._trials):
                rate = (self._accepted[j] + _PRIOR_WEIGHT * engine_alpha) / (
                    self._trials[j] + _PRIOR_WEIGHT
                )
            else:
                rate = engine_alpha
            g *= min(alpha, rate)
            out.append(g)
        return out


class ProbabilityCalibration:
    """How often drafts at a branch are accepted, by the probability their proposer gave them.

    A suffix tree's frequencies are the chance of each continuation only where continuations
    repeat. At a branch whose continuations were each seen once (an agent's tool call with a
    new argument every time: two earlier cities under `"city": "`), the tree says 1/2 for the
    next city and verification rejects it nearly every time. So every verified draft at a
    branch (conditional probability q, its tree frequency given the drafts before it, below
    1) falls in a bin of q, each bin counts (decayed) its trials and acceptances, and such a
    draft's calibrated probability is its bin's rate with a prior of q itself: until a bin has
    data, the tree's word stands. A draft with no other continuation (q = 1) keeps 1: how
    often those are right is what the per-position rates measure, which for such a proposer
    count only those drafts (Drafter._calibrate), so that a rejection at a branch is counted
    once, here, and not also against every draft at its position.
    """

    EDGES = (0.2, 0.4, 0.6, 0.8)  # bins [0, .2) ... [.8, 1)
    SURE = 0.999
    DECAY = 0.99
    PRIOR = 2.0

    def __init__(self) -> None:
        self._trials = [0.0] * (len(self.EDGES) + 1)
        self._accepted = [0.0] * (len(self.EDGES) + 1)

    def observe(self, qs: list[float], num_verified: int, num_accepted: int) -> None:
        """A verification of drafts with conditional probabilities qs: the first num_verified
        were verified and the first num_accepted of those accepted."""
        d = self.DECAY
        for j, q in enumerate(qs[:num_verified]):
            if j > num_accepted:
                break  # drafts past the first rejection were never tried
            if q >= self.SURE:
                continue
            b = bisect_right(self.EDGES, q)
            self._trials[b] = self._trials[b] * d + 1.0
            self._accepted[b] = self._accepted[b] * d + (1.0 if j < num_accepted else 0.0)

    def rate(self, q: float) -> float:
        if q >= self.SURE:
            return 1.0
        b = bisect_right(self.EDGES, q)
        return (self._accepted[b] + self.PRIOR * q) / (self._trials[b] + self.PRIOR)

    def path(self, qs: list[float]) -> list[float]:
        """A draft's conditional probabilities -> its calibrated path probabilities."""
        out: list[float] = []
        acc = 1.0
        for q in qs:
            acc *= self.rate(q)
            out.append(acc)
        return out


class EngineAcceptance:
    """The engine-wide acceptance: the prior of a request with no verification yet."""

    DECAY = 0.99

    def __init__(self) -> None:
        self._accepted = _PRIOR_ALPHA * _PRIOR_WEIGHT
        self._trials = _PRIOR_WEIGHT

    def observe(self, accepted: int, trials: int) -> None:
        self._accepted = self._accepted * self.DECAY + accepted
        self._trials = self._trials * self.DECAY + trials

    def relax(self) -> None:
        """A step that verified nothing: drift back toward the prior. Without it, an engine
        whose drafts once all failed (alpha near 0) would never draft again, whatever its
        text does later (the off-switch stuck off)."""
        d = self.DECAY
        self._accepted = self._accepted * d + (1 - d) * _PRIOR_ALPHA * _PRIOR_WEIGHT
        self._trials = self._trials * d + (1 - d) * _PRIOR_WEIGHT

    @property
    def alpha(self) -> float:
        return self._accepted / self._trials
