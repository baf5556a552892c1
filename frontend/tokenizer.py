"""The frontend's tokenizer: `engine_core.tokenizer`'s loader, and `python -m frontend.tokenizer`."""

from __future__ import annotations

from engine_core.tokenizer import load_tokenizer

__all__ = ["load_tokenizer"]


if __name__ == "__main__":
    # `python -m frontend.tokenizer [MODEL]`: convert and cache a tokenizer ahead of time.
    import sys

    tok = load_tokenizer(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"tokenizer ready: {type(tok).__name__}, vocabulary {len(tok)}")
