"""Incremental detokenization and stop strings: token ids in, the text a user may see out.

The prefix/read-offset algorithm (vLLM's `detokenize_incrementally`, HF's `DecodeStream`):
decode a short window of ids and emit only what the window's text gained over the text of its
first part. The window keeps the context that decides leading spaces (SentencePiece strips the
space of a text's first token, byte-level BPE does not) and holds tokens back while their bytes
end in an incomplete UTF-8 sequence, which decodes to U+FFFD until the next token completes it.
Each new token costs one decode of a few ids, never a decode of the whole output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import tokenizers

# Prompt tokens decoded together with the output, for the leading-space context.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def make_decode(
    tokenizer, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
) -> Callable[[Sequence[int]], str]:
    """A function ids -> text that decodes as `tokenizer.decode` does, as cheaply as possible."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if isinstance(backend, tokenizers.Tokenizer):
        # The Rust tokenizer itself: transformers' Python wrapper around it costs more than the
        # decode. Fast tokenizers never put spaces between special tokens, so that flag is moot.
        return functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no decode() method")
    return functools.partial(
        tokenizer.decode,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
        clean_up_tokenization_spaces=False,
    )


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, as they are generated.

    Invariant: the window `_ids` starts at a token boundary where decoding restarts cleanly
    (the text before it ended in a complete character), `_prefix_text` is the text of its first
    `_read_offset` ids, and everything after them is not yet emitted.
    """

    __slots__ = ("_decode", "_ids", "_read_offset", "_prefix_text")

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._decode = make_decode(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        prefix_text = self._decode(context) if context else ""
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its text is no clean start for the output.
            context, prefix_text = [], ""
        self._ids: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = prefix_text

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Add generated token ids; return the text they complete (possibly empty)."""
        delta = ""
        ids = self._ids
        for token_id in new_token_ids:
            ids.append(token_id)
            text = self._decode(ids)
            # A trailing U+FFFD is an incomplete UTF-8 sequence the next token may complete.
            if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT_CHAR):
                delta += text[len(self._prefix_text) :]
                self._advance()
        return delta

    def flush(self) -> str:
        """At the end of the output: the text still held back, as `decode` renders it (U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._ids)
        delta = text[len(self._prefix_text) :]
        self._advance()
        return delta

    def _advance(self) -> None:
        # The emitted ids become the next window's prefix; older ids are no longer needed.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)


# ---------------------------------------------------------------- stop strings


def find_stop_string(
    text: str, num_new_chars: int, stop: tuple[str, ...]
) -> tuple[str, int] | None:
    """The stop string that occurs first in `text` and overlaps its last `num_new_chars`
    characters (older text was searched before), with its start; None when there is none."""
    best: tuple[str, int] | None = None
    for s in stop:
        start = text.find(s, max(0, len(text) - num_new_chars - len(s) + 1))
        if start != -1 and (best is None or start < best[1]):
            best = (s, start)
    return best


def stop_prefix_length(text: str, stop: tuple[str, ...], limit: int) -> int:
    """Length of the longest end of `text` (at most `limit`) that may begin a stop string."""
    for k in range(limit, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0
