"""The model runner's bitmask: row i of a drafted request's mask lands on its logits row i."""

from __future__ import annotations

import math

import numpy as np
import torch

from engine_core.protocol import GrammarOutput
from engine_core.structured_output.bitmask import apply_grammar_bitmask

VOCAB = 64  # two int32 words a row


def mask_row(allowed: list[int]) -> np.ndarray:
    bits = np.zeros(VOCAB, dtype=np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def test_each_position_of_a_drafted_request_gets_its_own_row_and_plain_rows_stay():
    # Logits rows: "a" with two drafts (3 positions), "p" plain, "b" without drafts.
    rows = ["a", "a", "a", "p", "b"]
    logits = torch.zeros(len(rows), VOCAB)
    allowed = {("a", 0): [1, 2], ("a", 1): [3], ("a", 2): [40, 63], ("b", 0): [7]}
    mask = np.stack([mask_row(allowed[k]) for k in [("b", 0), ("a", 0), ("a", 1), ("a", 2)]])
    grammar = GrammarOutput(structured_req_ids=["b", "a"], grammar_bitmask=mask.tobytes())
    apply_grammar_bitmask(logits, rows, grammar)
    for (req, pos), tokens in allowed.items():
        row = rows.index(req) + pos
        kept = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert kept == tokens, (req, pos)
        assert logits[row, tokens[0]] == 0.0 and logits[row, 0] == -math.inf
    assert torch.isfinite(logits[3]).all()  # the plain request's row is untouched
