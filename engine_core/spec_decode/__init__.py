"""Speculative decoding: draft proposers (n-gram, suffix), the off-switch and the drafter.

make_drafter(config) is what the EngineCore builds; None when speculation is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_core.config import EngineConfig
    from engine_core.spec_decode.config import SpeculativeConfig
    from engine_core.spec_decode.drafter import Drafter, Proposer


def make_proposer(spec: SpeculativeConfig) -> Proposer:
    """The proposer that spec.method names."""
    if spec.method == "ngram":
        from engine_core.spec_decode.ngram import NgramProposer

        return NgramProposer(
            spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
        )
    if spec.method == "suffix":
        from engine_core.spec_decode.suffix import SuffixProposer

        return SuffixProposer(spec)
    raise ValueError(f"speculative_config: unknown method {spec.method!r}.")


def make_drafter(config: EngineConfig) -> Drafter | None:
    if config.speculative_config is None:
        return None
    from engine_core.spec_decode.config import SpeculativeConfig
    from engine_core.spec_decode.drafter import Drafter

    spec = SpeculativeConfig.from_dict(config.speculative_config)
    return Drafter(spec, make_proposer(spec))
