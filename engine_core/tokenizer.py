"""Tokenizer loading: transformers' tokenizer, cached once converted from GGUF.

The frontend tokenizes and detokenizes with it; the EngineCore builds its grammar vocabulary
(structured outputs) from the same tokenizer.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile

from engine_core.model_files import ModelFiles, cache_dir, resolve_model

logger = logging.getLogger(__name__)


def _cached_dir(files: ModelFiles) -> str:
    return os.path.join(cache_dir(), "tokenizers", files.cache_key())


def is_saved_tokenizer(model: str | None = None, tokenizer: str | None = None) -> bool:
    """Whether load_tokenizer(model, tokenizer) reads a saved Hugging Face tokenizer (a
    directory, or the cached conversion of a GGUF's) rather than converting a GGUF's."""
    if tokenizer is not None:
        return True
    files = resolve_model(model)
    if files.gguf_file is None:
        return True
    return os.path.isfile(os.path.join(_cached_dir(files), "tokenizer_config.json"))


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str | None = None, tokenizer: str | None = None):
    """The tokenizer (and chat template) for `model`, or from `tokenizer` when given.

    Reading a tokenizer out of a GGUF takes transformers about 10 s, so the converted
    tokenizer is saved under the cache folder, keyed by the GGUF's path, size and mtime.
    """
    # AutoTokenizer only where it is needed: importing it scans every model module of
    # transformers (about a second), which the cached GGUF tokenizer's path never needs.
    if tokenizer is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    files = resolve_model(model)
    if files.gguf_file is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(files.directory)
    cached = _cached_dir(files)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        try:
            # The fast class directly: AutoTokenizer would import torch (seconds at start-up)
            # where it is installed and visible.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(cached)
        except Exception as e:  # a broken cache is rebuilt, never fatal
            logger.warning("rebuilding the cached tokenizer at %s: %s", cached, e)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file)
    os.makedirs(os.path.dirname(cached), mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(cached))
    try:
        tok.save_pretrained(staging)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
    except OSError as e:
        logger.warning("could not cache the tokenizer at %s: %s", cached, e)
        shutil.rmtree(staging, ignore_errors=True)
    return tok
