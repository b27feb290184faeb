"""Incremental detokenisation equals a full decode, never takes text back, holds partial UTF-8
characters, and decodes only a short window per token; find_stop finds new matches only."""

from __future__ import annotations

import random

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from baton_paged.processing.detokenizer import IncrementalDetokenizer, find_stop


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def stream(tokenizer, prompt, output, skip_special_tokens=True) -> tuple[list[str], str]:
    """Feed ``output`` token by token; return the pieces and the text after ``flush``."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    pieces = [detokenizer.add(token) for token in output]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == detokenizer.text
    return pieces, detokenizer.text


MULTIBYTE = "héllo ✓ 🙂 wörld 日本語 — naïve café\n\tdef f(x): return x  # ✓✓ 🙂🙂"


def test_multibyte_text_streams_whole_characters(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    pieces, text = stream(tokenizer, tokenizer.encode("prompt: "), ids)
    assert text == MULTIBYTE == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens hold a partial character back


def test_a_four_byte_character_appears_with_its_last_byte(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1, "the tiny tokenizer splits the emoji into byte tokens"
    pieces, _ = stream(tokenizer, [], ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) + ["🙂"]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_token_sequences_equal_a_full_decode(tokenizer, data):
    vocab = len(tokenizer)
    token_lists = st.lists(st.integers(0, vocab - 1), max_size=40)
    prompt = data.draw(token_lists, label="prompt")
    output = data.draw(token_lists, label="output")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    pieces, text = stream(tokenizer, prompt, output, skip)
    assert text == tokenizer.decode(output, skip_special_tokens=skip)


def test_streamed_text_is_never_taken_back(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(200):
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        detokenizer = IncrementalDetokenizer(tokenizer, [rng.randrange(vocab)])
        final = tokenizer.decode(output, skip_special_tokens=True)
        for token in output:
            detokenizer.add(token)
            assert final.startswith(detokenizer.text)


def test_special_tokens_follow_skip_special_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [*tokenizer.encode("hi"), eos, *tokenizer.encode(" there")]
    assert stream(tokenizer, [eos], ids, skip_special_tokens=True)[1] == "hi there"
    assert stream(tokenizer, [eos], ids, skip_special_tokens=False)[1] == (
        "hi" + tokenizer.eos_token + " there"
    )


def test_prompt_ending_inside_a_character_does_not_leak_into_the_output(tokenizer):
    ids = tokenizer.encode("x🙂y")
    cut = 2  # "x" and the emoji's first byte
    assert tokenizer.decode(ids[:cut]).endswith("\ufffd")
    _, text = stream(tokenizer, ids[:cut], ids[cut:])
    assert text == tokenizer.decode(ids[cut:])


class CountingTokenizer:
    """Wraps a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, token_ids, **kwargs):
        self.longest = max(self.longest, len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def test_each_step_decodes_a_short_window(tokenizer):
    ids = tokenizer.encode(MULTIBYTE * 30)
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting, tokenizer.encode("a long prompt " * 20))
    for token in ids:
        detokenizer.add(token)
    assert detokenizer.text == MULTIBYTE * 30
    assert len(ids) > 500 and counting.longest <= 10


@pytest.mark.parametrize(
    ("text", "new_chars", "stops", "expected"),
    [
        ("hello wor", 3, ["world"], None),  # not complete yet
        ("hello world", 2, ["world"], (6, "world")),  # spans old and new text
        ("hello world", 11, ["world"], (6, "world")),  # all new
        ("abc STOP def", 4, ["STOP"], None),  # an old match was handled on its own step
        ("abc STOP def STOP", 5, ["STOP"], (13, "STOP")),  # the new one, not the old one
        ("x END y HALT", 12, ["HALT", "END"], (2, "END")),  # earliest, not first listed
        ("a ###", 3, ["##", "###"], (2, "##")),  # same start: first listed
        ("a ###", 3, ["###", "##"], (2, "###")),
        ("a ###", 1, ["##"], (3, "##")),  # must end in the new text: not at 2
        ("anything", 0, ["thing"], None),  # nothing new
        ("short", 99, ["or"], (2, "or")),  # new_chars past the start is clamped
        ("no match here", 5, [], None),
    ],
)
def test_find_stop(text, new_chars, stops, expected):
    assert find_stop(text, new_chars, stops) == expected


def test_find_stop_agrees_with_a_full_search_on_random_text():
    rng = random.Random(1)
    for _ in range(500):
        old = "".join(rng.choice("ab ") for _ in range(rng.randrange(0, 12)))
        new = "".join(rng.choice("ab ") for _ in range(rng.randrange(0, 6)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 4))) for _ in range(2)]
        text = old + new
        # Matches that end inside the new text, found the slow way.
        matches = [
            (i, stop)
            for i in range(len(text))
            for stop in stops
            if text.startswith(stop, i) and i + len(stop) > len(old)
        ]
        expected = min(matches, key=lambda m: (m[0], stops.index(m[1]))) if matches else None
        assert find_stop(text, len(new), stops) == expected


def test_tokens_go_through_the_rust_decode_stream(tokenizer):
    """A stock fast tokenizer decodes each token by one ``DecodeStream`` step, not from Python."""
    detokenizer = IncrementalDetokenizer(tokenizer, [], True)
    assert detokenizer._stream is not None
    calls = []
    real = detokenizer._decode_window
    detokenizer._decode_window = lambda: calls.append(1) or real()
    for token in tokenizer.encode(MULTIBYTE):
        detokenizer.add(token)
    assert calls == []


class FailingStream:
    """A decode stream whose prefix check fails at its ``fail_at``-th step."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.steps, self.fail_at = inner, 0, fail_at

    def step(self, rust, token):
        self.steps += 1
        if self.steps == self.fail_at:
            raise Exception("Invalid prefix encountered")
        return self.inner.step(rust, token)


@pytest.mark.parametrize("fail_at", [1, 2, 5, 17])
def test_a_failing_stream_hands_over_to_the_python_path_losing_nothing(tokenizer, fail_at):
    ids = tokenizer.encode(MULTIBYTE)
    prompt = tokenizer.encode("prompt: ")
    want_pieces, want = stream(tokenizer, prompt, ids)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, True)
    detokenizer._stream = FailingStream(detokenizer._stream, fail_at)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert detokenizer._stream is None
    assert "".join(pieces) == want == MULTIBYTE
    assert pieces == want_pieces
