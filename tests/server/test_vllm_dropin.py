"""What a vLLM user sends beyond OpenAI's API works here too: vLLM's /tokenize, /detokenize and
/version routes and /v1/models cards, the chat template options (``chat_template_kwargs``,
``add_generation_prompt``, ``continue_final_message``), ``truncate_prompt_tokens``,
``request_id``, and the fields current OpenAI SDKs send (accepted, changing no output)."""

from __future__ import annotations

import httpx
import pytest
from serving import HEADERS, MAX_MODEL_LEN, MODEL, offline, serving
from test_openai_strict import USER_HI, assert_refused, post

from baton_paged import __version__
from baton_paged.processing.chat_prompt import conversation_prompt
from baton_paged.sampling_params import SamplingParams


def get(server, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers=HEADERS, timeout=30)


def test_tokenize_and_detokenize_round_trip(server):
    tokenizer = server.engine.tokenizer
    body = {"prompt": "def main():", "return_token_strs": True}
    reply = httpx.post(f"{server.url}/tokenize", json=body).json()
    expected = tokenizer("def main():").input_ids
    assert reply["tokens"] == expected and reply["count"] == len(expected)
    assert reply["max_model_len"] == MAX_MODEL_LEN and len(reply["token_strs"]) == len(expected)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": reply["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(expected)


def test_tokenize_a_conversation_as_the_chat_route_renders_it(server):
    reply = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": USER_HI})
    rendered = conversation_prompt(server.engine.tokenizer, USER_HI)
    assert reply.json()["tokens"] == rendered["prompt_token_ids"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "messages": USER_HI}, 400, None),
    ],
)
def test_utility_routes_refuse_what_cannot_work(server, path, body, status, param):
    reply = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert reply.status_code == status and (
        param is None or reply.json()["error"]["param"] == param
    )


def test_tokenizer_info_is_served_only_when_enabled(server, tiny_model_dir):
    assert httpx.get(f"{server.url}/tokenizer_info").status_code == 404
    with serving(tiny_model_dir("llama"), tokenizer_info=True) as enabled:
        info = httpx.get(f"{enabled.url}/tokenizer_info").json()
        tokenizer = enabled.engine.tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["model_max_length"] == MAX_MODEL_LEN
    assert info["chat_template"] == tokenizer.chat_template


def test_version_and_model_cards(server):
    assert httpx.get(f"{server.url}/version").json() == {"version": __version__}
    (card,) = get(server, "/v1/models").json()["data"]
    assert card["id"] == MODEL and card["root"] == MODEL
    assert card["max_model_len"] == MAX_MODEL_LEN and card["created"] > 0


def test_continue_final_message_and_template_kwargs(server, client):
    conversation = [*USER_HI, {"role": "assistant", "content": "Sure, here"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    prompt = conversation_prompt(
        server.engine.tokenizer, conversation, add_generation_prompt=False,
        continue_final_message=True,
    )  # fmt: skip
    assert reply.choices[0].message.content == offline(server, prompt, 4).text
    body = {"model": MODEL, "messages": USER_HI, "chat_template_kwargs": {"tools": []}}
    assert_refused(post(server, "chat/completions", body), server, 400,
                   "may not set ['tools']", param="chat_template_kwargs")  # fmt: skip


def test_truncate_prompt_tokens_keeps_the_prompts_end(server, client):
    ids = list(range(5, 45))
    reply = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=3, temperature=0,
        extra_body={"truncate_prompt_tokens": 8},
    )  # fmt: skip
    assert reply.usage.prompt_tokens == 8
    assert reply.choices[0].text == offline(server, {"prompt_token_ids": ids[-8:]}, 3).text


def test_request_id_names_the_reply(client):
    reply = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"request_id": "my-id-1"}
    )
    assert reply.id == "cmpl-my-id-1"


def test_fields_current_sdks_send_are_accepted_and_change_nothing(server, client):
    sent = {"store": True, "metadata": {"k": "v"}, "reasoning_effort": "low",
            "verbosity": "low", "prompt_cache_key": "c", "safety_identifier": "s"}  # fmt: skip
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0, extra_body=sent
    )
    plain = client.chat.completions.create(model=MODEL, messages=USER_HI, max_tokens=3,
                                           temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == plain.choices[0].message.content


def test_allowed_token_ids_and_bad_words_reach_the_engine(server, client):
    allowed = [3, 17, 42, 99]
    extra = {"allowed_token_ids": allowed, "bad_words": ["the"], "ignore_eos": True}
    reply = client.completions.create(
        model=MODEL, prompt="def main():", max_tokens=6, temperature=0, extra_body=extra
    )
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            allowed_token_ids=allowed, bad_words=["the"])  # fmt: skip
    expected = server.offline.generate(["def main():"], params)[0].outputs[0]
    assert reply.choices[0].text == expected.text and set(expected.token_ids) <= set(allowed)
    bad = {"model": MODEL, "prompt": "x", "allowed_token_ids": [10**7]}
    assert_refused(post(server, "completions", bad), server, 400, param="allowed_token_ids")


def test_the_models_generation_config_fills_unset_fields(tiny_model_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    path = tmp_path / "with-defaults"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = GenerationConfig.from_pretrained(path)
    config.update(max_new_tokens=5)
    config.save_pretrained(path)
    with serving(path) as running:
        body = {"model": MODEL, "messages": USER_HI, "ignore_eos": True}
        unset = post(running, "chat/completions", body).json()
        given = post(running, "chat/completions", {**body, "max_tokens": 2}).json()
    assert unset["usage"]["completion_tokens"] == 5
    assert given["usage"]["completion_tokens"] == 2
