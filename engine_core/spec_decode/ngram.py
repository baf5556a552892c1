"""N-gram (prompt lookup) proposer, as vLLM's ngram_proposer: the longest suffix match.

For n from prompt_lookup_max down to prompt_lookup_min, look for an earlier occurrence of
the request's last n tokens in its prompt + output; at the longest n found, propose the k
tokens that followed it. Of several occurrences the most recent wins (the text the model
is repeating now). Numpy over a per-request token array grown incrementally.
"""

from __future__ import annotations

import numpy as np

from engine_core.sched.request import Request


class NgramProposer:
    """Proposes up to k drafts per request by prompt lookup."""

    def __init__(self, num_speculative_tokens: int, lookup_min: int, lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max
        self._tokens: dict[str, tuple[np.ndarray, int]] = {}

    def propose(self, request: Request, max_drafts: int) -> list[int]:
        tokens = self._array(request)
        return propose_ngram(tokens, self.lookup_min, self.lookup_max, min(self.k, max_drafts))

    def finish(self, request: Request, completed: bool) -> None:
        """Forget a request (finished, aborted or dropped)."""
        self._tokens.pop(request.request_id, None)

    def _array(self, request: Request) -> np.ndarray:
        buf, n = self._tokens.get(request.request_id, (None, 0))
        total = request.num_tokens
        if buf is None or total > buf.shape[0] or total < n:
            grown = np.empty(max(2 * total, 64), dtype=np.int64)
            if buf is not None and total >= n:
                grown[:n] = buf[:n]
            else:
                n = 0
            buf = grown
        if total > n:
            buf[n:total] = request.all_token_ids[n:total]
        self._tokens[request.request_id] = (buf, total)
        return buf[:total]


def propose_ngram(tokens: np.ndarray, lookup_min: int, lookup_max: int, k: int) -> list[int]:
    """The k tokens after the most recent earlier occurrence of the longest suffix n-gram."""
    total = tokens.shape[0]
    if k < 1 or total < lookup_min + 1:
        return []
    # Candidates: starts i of an n-gram that ends before the last token (so it has a successor).
    last = tokens[-1]
    ends = np.flatnonzero(tokens[: total - 1] == last)  # i + n - 1 for a match of any n
    best_end = -1
    for n in range(1, min(lookup_max, total - 1) + 1):
        ends = ends[ends >= n - 1]
        if n > 1:
            ends = ends[tokens[ends - (n - 1)] == tokens[total - n]]
        if ends.size == 0:
            break
        if n >= lookup_min:
            best_end = int(ends[-1])
    if best_end < 0:
        return []
    return tokens[best_end + 1 : best_end + 1 + k].tolist()
