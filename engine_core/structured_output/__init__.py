"""Structured outputs: grammars compiled by xgrammar, token bitmasks applied to the logits."""
