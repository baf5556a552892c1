"""Suffix decoding (Arctic Inference's method, vLLM's `suffix`): drafts from suffix trees.

Two trees of every token window up to suffix_decoding_max_tree_depth long, each node
counting how often its path occurred: one per request over its prompt and output (grown by
one token a step), and one global over the outputs of recently finished requests. A
proposal finds the longest suffix of the request's tokens that is a path in a tree and has
continuations, then walks the most frequent child while the product of the children's
frequencies (the draft's estimated acceptance) stays at least suffix_decoding_min_token_prob,
up to max_spec_factor * match length tokens (adaptive: a long match earns a long draft).
Of the two trees' proposals the one with the higher expected accepted length wins.

`arctic-inference` on PyPI has suffix decoding only in source tarballs (0.3.0: a C++
extension built against torch and vLLM); its one wheel, 0.0.4, predates it. So this is a
compact pure-Python tree. Its global tree is capped in tokens as well as in requests
(Python nodes cost more than Arctic's C++ ones).
"""

from __future__ import annotations

from collections import deque

from engine_core.sched.request import Request
from engine_core.spec_decode.config import SpeculativeConfig

# The global tree's token cap (about 6 KB of Python objects per token of varied text).
_MAX_GLOBAL_TOKENS = 32768
# Of the matched suffixes with continuations, the longest two are tried, and the longest of
# at most depth / 2 tokens (a node near the tree's depth has few tokens below it to propose).
_LONGEST_TRIED = 2


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] | None = None

    def child(self, token: int) -> _Node:
        if self.children is None:
            self.children = {}
        node = self.children.get(token)
        if node is None:
            node = self.children[token] = _Node()
        return node


class SuffixTree:
    """Counts of every window (up to `depth` tokens) of the sequences added to it."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.root = _Node()

    def add_sequence(self, tokens: list[int]) -> None:
        active = [self.root]
        for t in tokens:
            active = self._extend(active, t)

    def remove_sequence(self, tokens: list[int]) -> None:
        """Undo add_sequence(tokens): decrement every window, pruning nodes that reach 0."""
        for i in range(len(tokens)):
            node = self.root
            for t in tokens[i : i + self.depth]:
                assert node.children is not None
                child = node.children[t]
                child.count -= 1
                if child.count == 0:
                    del node.children[t]
                    break
                node = child

    def _extend(self, active: list[_Node], token: int) -> list[_Node]:
        """active[i]: the node of the sequence's last i tokens; returns it one token on."""
        new = [self.root]
        for node in active[: self.depth]:
            child = node.child(token)
            child.count += 1
            new.append(child)
        return new

    def match(self, context: list[int]) -> list[tuple[_Node, int]]:
        """Nodes of the context's suffixes that are paths with continuations: (node, length),
        longest first."""
        found = []
        limit = min(self.depth, len(context))
        for m in range(1, limit + 1):
            node = self.root
            for t in context[len(context) - m :]:
                node = node.children.get(t) if node.children else None
                if node is None:
                    break
            if node is None:
                break  # a longer suffix cannot be a path either
            if node.children:
                found.append((node, m))
        return found[::-1]


class _RequestTree(SuffixTree):
    """A request's tree, grown incrementally as its tokens grow."""

    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.active = [self.root]
        self.num_tokens = 0

    def sync(self, tokens: list[int]) -> None:
        for t in tokens[self.num_tokens :]:
            self.active = self._extend(self.active, t)
        self.num_tokens = len(tokens)

    def own_matches(self) -> list[tuple[_Node, int]]:
        # The suffix nodes are the active ones: no walk needed.
        return [(n, m) for m, n in enumerate(self.active) if m and n.children][::-1]


def _speculate(
    node: _Node, match_len: int, max_drafts: int, factor: float, min_prob: float
) -> tuple[list[int], list[float]]:
    """Walk the most frequent children: the draft tokens and each one's path probability
    (the product of the children's frequencies up to it: its estimated acceptance)."""
    limit = min(max_drafts, int(match_len * factor))
    drafts: list[int] = []
    probs: list[float] = []
    prob = 1.0
    while len(drafts) < limit and node.children:
        token, child = max(node.children.items(), key=lambda kv: kv[1].count)
        prob *= child.count / sum(c.count for c in node.children.values())
        if prob < min_prob:
            break
        drafts.append(token)
        probs.append(prob)
        node = child
    return drafts, probs


def _candidates(matches: list[tuple[_Node, int]], depth: int) -> list[tuple[_Node, int]]:
    picked = matches[:_LONGEST_TRIED]
    half = next((nm for nm in matches if nm[1] <= depth // 2), None)
    if half is not None and half not in picked:
        picked.append(half)
    return picked


class SuffixProposer:
    """Suffix decoding over per-request trees and a global tree of finished outputs."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.depth = config.suffix_decoding_max_tree_depth
        self.factor = config.suffix_decoding_max_spec_factor
        self.min_prob = config.suffix_decoding_min_token_prob
        self.max_cached = config.suffix_decoding_max_cached_requests
        self.global_tree = SuffixTree(self.depth)
        self._cached: deque[list[int]] = deque()
        self._cached_tokens = 0
        self._trees: dict[str, _RequestTree] = {}

    def propose(self, request: Request, max_drafts: int) -> list[int]:
        return self.propose_with_probs(request, max_drafts)[0]

    def propose_with_probs(
        self, request: Request, max_drafts: int
    ) -> tuple[list[int], list[float]]:
        """The draft and each token's path probability in its tree (non-increasing)."""
        tree = self._trees.get(request.request_id)
        if tree is None:
            tree = self._trees[request.request_id] = _RequestTree(self.depth)
        tokens = request.all_token_ids
        tree.sync(tokens)
        max_drafts = min(max_drafts, self.k)
        best: tuple[list[int], list[float]] = ([], [])
        best_score = 0.0  # expected accepted length: the sum of the path probabilities
        context = tokens[-self.depth :]
        for matches in (tree.own_matches(), self.global_tree.match(context)):
            for node, m in _candidates(matches, self.depth):
                drafts, probs = _speculate(node, m, max_drafts, self.factor, self.min_prob)
                score = sum(probs)
                if score > best_score:
                    best, best_score = (drafts, probs), score
        return best

    def finish(self, request: Request, completed: bool) -> None:
        """Drop the request's tree; a completed request's output joins the global tree."""
        self._trees.pop(request.request_id, None)
        output = request.output_token_ids
        if not completed or not output or self.max_cached == 0:
            return
        self.global_tree.add_sequence(output)
        self._cached.append(list(output))
        self._cached_tokens += len(output)
        while self._cached and (
            len(self._cached) > self.max_cached or self._cached_tokens > _MAX_GLOBAL_TOKENS
        ):
            old = self._cached.popleft()
            self._cached_tokens -= len(old)
            self.global_tree.remove_sequence(old)
