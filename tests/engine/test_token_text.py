"""text_decoder: the Rust tokenizer called directly gives tokenizer.decode's text, and only
where transformers' wrapper would have added nothing."""

from __future__ import annotations

import random

import pytest
import transformers

from baton_paged.processing.token_text import _decodes_by_forwarding, text_decoder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def random_ids(tokenizer, rng, count):
    return [rng.randrange(len(tokenizer)) for _ in range(count)]


def test_the_direct_path_gives_the_same_text(tokenizer):
    assert _decodes_by_forwarding(tokenizer)
    decode, rng = text_decoder(tokenizer), random.Random(3)
    for _ in range(300):
        ids, skip = random_ids(tokenizer, rng, rng.randint(0, 12)), rng.random() < 0.5
        assert decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)
    special = tokenizer.all_special_ids
    assert decode(special, True) == tokenizer.decode(special, skip_special_tokens=True)
    assert decode(special, False) == tokenizer.decode(special, skip_special_tokens=False)


def test_clean_up_or_an_own_decode_keeps_transformers_path(tokenizer, monkeypatch):
    calls = []

    class OwnDecode(type(tokenizer)):
        def decode(self, token_ids, **kwargs):
            calls.append(token_ids)
            return "own"

    monkeypatch.setattr(tokenizer, "__class__", OwnDecode)
    assert not _decodes_by_forwarding(tokenizer)
    assert text_decoder(tokenizer)([5, 6], True) == "own" and calls == [[5, 6]]
    monkeypatch.setattr(tokenizer, "__class__", OwnDecode.__mro__[1])
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert not _decodes_by_forwarding(tokenizer)


def test_an_object_without_a_rust_tokenizer_is_called_as_it_is():
    class Plain:
        def decode(self, token_ids, skip_special_tokens=False):
            return f"{list(token_ids)}{skip_special_tokens}"

    assert text_decoder(Plain())((1, 2), True) == "[1, 2]True"
