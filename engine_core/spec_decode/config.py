"""SpeculativeConfig: the validated `speculative_config` dict (vLLM's keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "suffix")
MAX_SPECULATIVE_TOKENS = 32

# vLLM's SpeculativeConfig keys; the suffix_decoding_* defaults are vLLM's (from Arctic Inference).
_KEYS = {
    "method",
    "num_speculative_tokens",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "suffix_decoding_max_tree_depth",
    "suffix_decoding_max_cached_requests",
    "suffix_decoding_max_spec_factor",
    "suffix_decoding_min_token_prob",
    "disable_by_batch_size",
}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """How drafts are proposed: the method, up to how many a step, and its knobs."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 5
    prompt_lookup_max: int = 5
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    # vLLM's key: no drafts in a step whose batch has at least this many requests (None: the
    # cost model alone decides, see spec_decode/switch.py).
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SpeculativeConfig:
        """Validate a user's dict; a ValueError names the bad key and value."""
        if not isinstance(raw, dict):
            raise ValueError(
                f"speculative_config must be a JSON object (a dict), got {type(raw).__name__}: "
                f"{raw!r}."
            )
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key {unknown[0]!r} (known: {sorted(_KEYS)})."
            )
        method = raw.get("method")
        if method not in METHODS:
            raise ValueError(
                f"speculative_config: method must be one of {list(METHODS)}, got {method!r}."
            )
        depth = _int(raw, "suffix_decoding_max_tree_depth", 24, 1, 1024)
        default_k = depth if method == "suffix" else None
        if "num_speculative_tokens" not in raw and default_k is None:
            raise ValueError(
                "speculative_config: num_speculative_tokens is required for method 'ngram' "
                "(an integer in [1, 32])."
            )
        k = _int(raw, "num_speculative_tokens", default_k, 1, MAX_SPECULATIVE_TOKENS)
        if method == "suffix":
            k = min(k, MAX_SPECULATIVE_TOKENS)
        lookup_max = _int(raw, "prompt_lookup_max", None, 1, 1 << 20)
        lookup_min = _int(raw, "prompt_lookup_min", None, 1, 1 << 20)
        # vLLM's rule: neither given means 5 and 5; one given alone sets the other.
        if lookup_min is None and lookup_max is None:
            lookup_min = lookup_max = 5
        elif lookup_min is None:
            lookup_min = lookup_max
        elif lookup_max is None:
            lookup_max = lookup_min
        if lookup_min > lookup_max:
            raise ValueError(
                f"speculative_config: prompt_lookup_min ({lookup_min}) must be at most "
                f"prompt_lookup_max ({lookup_max})."
            )
        factor = _float(raw, "suffix_decoding_max_spec_factor", 1.0, 0.0, 1e6)
        min_prob = _float(raw, "suffix_decoding_min_token_prob", 0.1, 0.0, 1.0)
        cached = _int(raw, "suffix_decoding_max_cached_requests", 10000, 0, 1 << 31)
        by_batch = _int(raw, "disable_by_batch_size", None, 2, 1 << 31)
        return cls(
            method=method,
            num_speculative_tokens=k,
            prompt_lookup_min=lookup_min,
            prompt_lookup_max=lookup_max,
            suffix_decoding_max_tree_depth=depth,
            suffix_decoding_max_cached_requests=cached,
            suffix_decoding_max_spec_factor=factor,
            suffix_decoding_min_token_prob=min_prob,
            disable_by_batch_size=by_batch,
        )


def _int(raw: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    if key not in raw or raw[key] is None:
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(
            f"speculative_config: {key} must be an integer in [{lo}, {hi}], got {value!r}."
        )
    return value


def _float(raw: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    if key not in raw or raw[key] is None:
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ValueError(
            f"speculative_config: {key} must be a number in [{lo}, {hi}], got {value!r}."
        )
    return float(value)
