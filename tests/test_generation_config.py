"""vLLM's --generation-config: default sampling parameters from the model's generation_config.json, on the
server and in `LLM`, a request's own values winning."""

import json
import shutil

import httpx
import pytest

from jaxinfer import cli
from jaxinfer.model.checkpoint import DEFAULT_MODEL_DIR, CheckpointError, generation_defaults
from jaxinfer.server.app import ServerConfig
from jaxinfer.server.protocol import Limits, check_sampling_defaults, parse_chat, parse_completion
from live_server import LiveServer

QWEN_LIKE = {"bos_token_id": 1, "eos_token_id": [2, 4], "do_sample": True, "temperature": 0.7, "top_p": 0.8,
             "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 100, "min_p": None}


@pytest.fixture
def checkpoint(tmp_path):
    """The embedded model with a generation config as Qwen2.5 ships one."""
    directory = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, directory)
    (directory / "generation_config.json").write_text(json.dumps(QWEN_LIKE))
    return directory


def test_the_sampling_fields_are_read_and_nothing_else(checkpoint, tmp_path):
    expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 100}
    assert generation_defaults("auto", checkpoint) == expected
    assert generation_defaults("vllm", checkpoint) == {}
    assert generation_defaults(str(checkpoint), None) == expected  # a folder given by name
    assert generation_defaults("auto", None) == {}  # the embedded model's sets no sampling field
    assert generation_defaults("auto", "configs/smollm2-135m.json") == {}  # random weights: no folder
    with pytest.raises(CheckpointError, match="no generation_config.json there"):
        generation_defaults(str(tmp_path / "nowhere"), None)


def test_a_request_takes_the_defaults_where_it_says_nothing():
    limits = Limits(256, 128, sampling_defaults={"temperature": 0.7, "top_p": 0.8, "top_k": 20})
    plain = parse_completion({"prompt": "hi"}, limits).params
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (0.7, 0.8, 20, 0.0)
    own = parse_completion({"prompt": "hi", "temperature": 0, "top_k": -1, "top_p": None}, limits).params
    assert (own.temperature, own.top_p, own.top_k) == (0.0, 0.8, 0)  # -1 (no limit) is held as 0; null: default
    chat, _, _ = parse_chat({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}, limits)
    assert (chat.params.temperature, chat.params.top_p) == (0.7, 0.5)
    assert parse_completion({"prompt": "hi"}, Limits(256, 128)).params.temperature == 1.0  # OpenAI's without one


def test_max_new_tokens_is_the_default_of_chat_requests_only():
    """As vLLM (since its #34063): a chat request without max_tokens takes max_new_tokens (the engine cuts it to
    the context), one with its own is not capped by it; completions keep OpenAI's 16."""
    limits = Limits(256, 128, sampling_defaults={"max_tokens": 100})
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    chat, _, _ = parse_chat(ask, limits)
    assert chat.params.max_tokens == 100 and not chat.max_tokens_given  # no 400 past the context: cut to it
    assert parse_chat({**ask, "max_tokens": 300}, limits)[0].params.max_tokens == 300
    assert parse_chat({**ask, "max_completion_tokens": 7}, limits)[0].params.max_tokens == 7
    assert parse_chat(ask, Limits(256, 128))[0].params.max_tokens is None  # to the end of the context
    assert parse_completion({"prompt": "hi"}, limits).params.max_tokens == 16


@pytest.mark.parametrize("defaults, field", [({"temperature": 5.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                             ({"top_k": -3}, "top_k"), ({"repetition_penalty": 0}, "repetition"),
                                             ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens")])
def test_defaults_a_request_could_not_send_are_refused_at_start_up(defaults, field):
    with pytest.raises(ValueError, match=f"the generation config's default {field}"):
        check_sampling_defaults(defaults)
    with pytest.raises(ValueError, match=field):
        ServerConfig(sampling_defaults=defaults)


def test_serve_reads_the_models_generation_config_unless_told_not_to(checkpoint, monkeypatch):
    from jaxinfer.server import run
    seen = []
    monkeypatch.setattr(run, "serve", lambda model, engine, config, *args, **kwargs: seen.append(config) and 0)
    assert cli.main(["serve", "--model", str(checkpoint), "--skip-warmup"]) == 0
    assert cli.main(["serve", "--model", str(checkpoint), "--generation-config", "vllm", "--skip-warmup"]) == 0
    assert seen[0].sampling_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                         "max_tokens": 100}
    assert seen[1].sampling_defaults == {}


def test_a_server_with_a_greedy_default_answers_greedily():
    """With temperature 0 as the default, two choices of a request that sends none are the greedy answer; a
    request's own temperature still samples. A chat request without max_tokens stops at max_new_tokens."""
    server = LiveServer(ServerConfig(sampling_defaults={"temperature": 0.0, "max_tokens": 5}))
    try:
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Who?"}], "ignore_eos": True}).json()
        assert (chat["usage"]["completion_tokens"], chat["choices"][0]["finish_reason"]) == (5, "length")
        ask = lambda **extra: httpx.post(f"{server.url}/v1/completions", timeout=60, json={  # noqa: E731
            "prompt": "And the king said", "max_tokens": 12, "ignore_eos": True, **extra}).json()["choices"]
        greedy = ask(temperature=0)[0]["text"]
        assert [c["text"] for c in ask(n=2)] == [greedy, greedy]
        sampled = {c["text"] for c in ask(n=4, temperature=1.5, seed=3)}
        assert sampled != {greedy}
        server.wait_idle()
    finally:
        server.close()


def test_llm_generates_with_the_generation_configs_defaults(checkpoint):
    from jaxinfer.llm import LLM, SamplingParams
    (checkpoint / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 5}))
    llm = LLM(checkpoint)
    assert (llm.get_default_sampling_params().temperature, llm.get_default_sampling_params().top_k) == (0.0, 5)
    assert llm.get_default_sampling_params().max_tokens == 16  # vLLM's default: the config sets no max_new_tokens
    prompt = "And the king said unto"
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    plain = LLM(checkpoint, generation_config="vllm")
    assert plain.get_default_sampling_params().temperature == 1.0
