"""``prompt_encoding.encode`` gives exactly the ids ``tokenizer.encode`` gives (it only holds the
GIL for less time), with and without special tokens, whatever the text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from baton_paged.processing.prompt_encoding import encode, untruncated

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "unicode: héllo wörld 你好 🙂 \u200b",
    "def main():\n    return 42\n",
    "<|endoftext|> special-looking text <s></s>",
    "x" * 5000,
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tokenizer(request, tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir(request.param))


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_the_fast_path_gives_the_tokenizers_own_ids(tokenizer, text, special):
    assert encode(tokenizer, text, special) == tokenizer.encode(text, add_special_tokens=special)


def test_arbitrary_text_encodes_alike(tokenizer):
    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.text(min_size=1, max_size=200))
    def check(text):
        assert encode(tokenizer, text) == tokenizer.encode(text)

    check()


def test_a_tokenizer_without_a_rust_backend_uses_its_own_encode():
    class PlainTokenizer:
        def encode(self, text, add_special_tokens=True):
            return [len(text), int(add_special_tokens)]

    assert encode(PlainTokenizer(), "abc", add_special_tokens=False) == [3, 0]


def test_truncation_stored_in_the_rust_tokenizer_never_cuts_a_prompt(tiny_model_dir):
    """transformers may load truncation from tokenizer.json; ``tokenizer.encode`` ignores it,
    and so must ``encode``, before and after the engine switches it off."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    text = "a long enough prompt to be cut at three tokens"
    whole = tokenizer.encode(text)
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    tokenizer.backend_tokenizer.enable_padding(length=64)
    assert encode(tokenizer, text) == whole
    assert encode(untruncated(tokenizer), text) == whole
    assert tokenizer.backend_tokenizer.truncation is None
    assert tokenizer.backend_tokenizer.padding is None
