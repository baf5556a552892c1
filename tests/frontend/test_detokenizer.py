"""Incremental detokenization: what a streaming client reads, token by token."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models

from frontend.detokenizer import (
    IncrementalDetokenizer,
    find_stop_string,
    stop_prefix_length,
)

MULTILINGUAL = "Hello 世界! 🎉🎊 café naïve Ελληνικά 日本語のテキスト 👩‍👩‍👧 ok"


@pytest.fixture(scope="module")
def tok():
    from frontend.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def partial_token_ids(tok) -> list[int]:
    """Byte-level tokens that are not complete characters on their own."""
    return [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed one token per step, as the engine does; the last element is the final flush."""
    return [detok.add_tokens([i]) for i in ids] + [detok.flush()]


def test_streamed_multibyte_text_equals_decode_and_never_shows_replacement_char(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    # The text must really split characters over tokens, or this test proves nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert "".join(deltas) == tok.decode(ids) == MULTILINGUAL
    assert not any("\ufffd" in d for d in deltas)


def test_each_character_is_sent_as_soon_as_its_last_token_arrives(tok):
    ids = tok.encode("a🎉b", add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tok, tok.encode("Say:")), ids)
    sent = ""
    for n, delta in enumerate(deltas[:-1], start=1):
        sent += delta
        # Everything decodable from the tokens so far, minus an incomplete tail, is out.
        assert sent == tok.decode(ids[:n]).rstrip("\ufffd")


def test_prompt_context_leaves_the_output_text_alone(tok):
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi 世"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = tok.encode(" Sure, 世界 is 'world'.", add_special_tokens=False)
    for skip in (True, False):
        deltas = stream(IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip), ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_are_skipped_or_shown_as_asked(tok):
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    shown = "".join(stream(IncrementalDetokenizer(tok, [], skip_special_tokens=False), ids))
    skipped = "".join(stream(IncrementalDetokenizer(tok, [], skip_special_tokens=True), ids))
    assert shown == "Hi<|im_end|>"
    assert skipped == "Hi"


def test_an_output_that_ends_inside_a_character_is_flushed_as_decode_shows_it(tok):
    ids = tok.encode("ok 🎉", add_special_tokens=False)[:-1]  # drop the emoji's last token
    detok = IncrementalDetokenizer(tok, [])
    sent = "".join(detok.add_tokens([i]) for i in ids)
    assert "\ufffd" not in sent
    assert sent + detok.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd")
    assert detok.flush() == ""  # nothing twice


def test_many_tokens_in_one_step_give_the_same_text(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    chunks = [detok.add_tokens(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(chunks) + detok.flush() == MULTILINGUAL


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), skip=st.booleans())
def test_random_token_sequences_stream_to_exactly_decode(tok, partial_token_ids, data, skip):
    # Mostly character fragments, so that multi-byte sequences are split, completed and broken.
    token = st.one_of(
        st.sampled_from(partial_token_ids),
        st.integers(0, tok.vocab_size - 1),
    )
    prompt = data.draw(st.lists(token, max_size=8), label="prompt")
    ids = data.draw(st.lists(token, min_size=1, max_size=30), label="output")
    deltas = stream(IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


# --------------------------------------------- a SentencePiece-style (Metaspace) tokenizer


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    """Llama-style decoding: '▁' is a space, bytes fall back to <0xXX>, a leading space is cut."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for word in ("▁Hello", "▁world", "!", "▁", "▁the", "▁end"):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


def sp_ids(tok: Tokenizer, *pieces: str) -> list[int]:
    out = []
    for p in pieces:
        if p.startswith("\\"):  # a character spelled as its UTF-8 byte tokens
            out += [tok.token_to_id(f"<0x{b:02X}>") for b in p[1:].encode()]
        else:
            out.append(tok.token_to_id(p))
    return out


def test_leading_space_of_the_first_output_token_is_kept_after_a_prompt(sp_tok):
    prompt = sp_ids(sp_tok, "<s>", "▁Hello")
    ids = sp_ids(sp_tok, "▁world", "\\世", "!", "▁the", "▁end", "</s>")
    deltas = stream(IncrementalDetokenizer(sp_tok, prompt), ids)
    # The user sees prompt + output read as one text: " world", not "world".
    whole = sp_tok.decode(prompt + ids)
    assert "".join(deltas) == whole[len(sp_tok.decode(prompt)) :] == " world世! the end"
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[:5] == [" world", "", "", "世", "!"]


def test_without_a_prompt_the_text_equals_decode(sp_tok):
    ids = sp_ids(sp_tok, "▁world", "▁", "\\é", "▁end", "\\🎉")
    assert "".join(stream(IncrementalDetokenizer(sp_tok, []), ids)) == sp_tok.decode(ids)


def test_an_object_without_decode_is_refused():
    with pytest.raises(TypeError, match="no decode"):
        IncrementalDetokenizer(object(), [1, 2])


# ------------------------------------------------------------------------ stop strings


def test_find_stop_string_returns_the_earliest_match_in_the_new_text():
    assert find_stop_string("say hello world", 8, ("world", "hello")) == ("hello", 4)
    assert find_stop_string("abc", 1, ("x",)) is None
    # A stop string that ends before the new text was already searched for.
    assert find_stop_string("stop, more", 4, ("stop",)) is None
    # One that began in the old text and ends in the new one is found.
    assert find_stop_string("the end", 2, ("e end",)) == ("e end", 2)


def test_stop_prefix_length_holds_back_only_a_possible_stop_start():
    assert stop_prefix_length("Hello wor", ("world",), 4) == 3
    assert stop_prefix_length("Hello war", ("world",), 4) == 0
    assert stop_prefix_length("abc", ("cd", "bcx"), 2) == 2
    assert stop_prefix_length("worl", ("world",), 2) == 0  # limit: never more than asked
