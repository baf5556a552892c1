"""speculative_config: vLLM's keys, and a clear error naming whatever is wrong."""

import pytest

from engine_core.config import EngineConfig
from engine_core.spec_decode.config import SpeculativeConfig
from frontend.cli import parse_args


def test_ngram_config_keeps_vllms_keys_and_defaults():
    c = SpeculativeConfig.from_dict(
        {
            "method": "ngram",
            "num_speculative_tokens": 5,
            "prompt_lookup_min": 2,
            "prompt_lookup_max": 4,
        }
    )
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (
        "ngram",
        5,
        2,
        4,
    )
    d = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (d.prompt_lookup_min, d.prompt_lookup_max) == (5, 5)
    one = SpeculativeConfig.from_dict(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    )
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (3, 3)


def test_suffix_defaults_follow_vllm():
    c = SpeculativeConfig.from_dict({"method": "suffix"})
    assert c.num_speculative_tokens == 24 == c.suffix_decoding_max_tree_depth
    assert c.suffix_decoding_min_token_prob == 0.1
    assert c.suffix_decoding_max_spec_factor == 1.0


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"method": "eagle", "num_speculative_tokens": 3}, "'eagle'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 33}, "got 33"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 3,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },
            "prompt_lookup_min (4)",
        ),
        ({"method": "ngram", "num_speculative_tokens": 3, "lookahead": 1}, "'lookahead'"),
        (
            {"method": "suffix", "suffix_decoding_min_token_prob": 2.0},
            "suffix_decoding_min_token_prob",
        ),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_speculative_configs_raise_naming_the_key_and_value(raw, named):
    with pytest.raises(ValueError, match="speculative_config") as e:
        EngineConfig(speculative_config=raw)
    assert named in str(e.value)


def test_the_cli_flag_parses_json_and_rejects_what_is_not(capsys):
    config, _ = parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    assert config.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(SystemExit):
        parse_args(["--speculative-config", "{method: ngram}"])
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--speculative-config", '{"method": "medusa", "num_speculative_tokens": 3}'])
    assert "'medusa'" in capsys.readouterr().err
