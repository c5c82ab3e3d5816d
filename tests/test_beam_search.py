"""Beam search (vLLM's `LLM.beam_search` and `use_beam_search`): against transformers' beam search on the same
checkpoint, by hand on made-up logprobs, and through the server with the real `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from hf_models import build
from jaxinfer import LLM, BeamSearchParams, EngineConfig, SamplingParams
from jaxinfer.engine.beam_search import BeamSearch
from jaxinfer.engine.request import CompletionOutput, Logprob
from live_server import ENGINE
from test_server import live  # noqa: F401 (a fixture: the embedded model served as "tiny")

PROMPTS = [[5, 9, 100, 7, 3], list(range(20, 39))]
WIDTH, ROUNDS = 4, 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    model = build("llama3", path)
    return model, LLM(path, EngineConfig(max_slots=8, page_size=8, max_model_len=64, dtype="float32"))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_the_beams_are_transformers_beams(tiny, length_penalty):
    """No EOS (ignore_eos; transformers' config has none): every beam runs the same rounds, and both keep the
    best `width` of 2 x width candidates a round, so the beams and their order are transformers'."""
    model, llm = tiny
    params = BeamSearchParams(WIDTH, ROUNDS, ignore_eos=True, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs):
        theirs = model.generate(torch.tensor([prompt]), num_beams=WIDTH, num_return_sequences=WIDTH,
                                do_sample=False, max_new_tokens=ROUNDS, length_penalty=0.0,
                                return_dict_in_generate=True, output_scores=True)
        assert [beam.tokens for beam in output.sequences] == theirs.sequences.tolist()
        assert [beam.cum_logprob for beam in output.sequences] == pytest.approx(theirs.sequences_scores.tolist(),
                                                                                abs=1e-4)
        assert all(beam.finish_reason == "length" and len(beam.logprobs) == ROUNDS for beam in output.sequences)
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=ROUNDS, temperature=0))
    # What the comparison is worth: the best beam is not the greedy answer for one of the prompts.
    assert any(o.outputs[0].token_ids != out.sequences[0].tokens[len(p):]
               for o, out, p in zip(greedy, outputs, PROMPTS))
    llm.engine.check_idle()


def test_a_beam_search_stops_at_the_end_of_the_context(tiny):
    _, llm = tiny
    prompt = list(range(1, 62))  # 3 tokens of room in a 64-token context
    [output] = llm.beam_search([prompt], BeamSearchParams(2, 10))
    assert [len(beam.tokens) for beam in output.sequences] == [64, 64]
    with pytest.raises(ValueError, match="prompt 0: .*maximum context length"):
        llm.beam_search([list(range(64))], BeamSearchParams(2, 4))
    llm.engine.check_idle()


@pytest.mark.parametrize("field, value", [("beam_width", 11), ("beam_width", 0), ("max_tokens", 0),
                                          ("length_penalty", float("nan")), ("ignore_eos", 1),
                                          ("temperature", -1.0)])
def test_bad_parameters_are_refused(field, value):
    kwargs = {"beam_width": 2, "max_tokens": 4, field: value}
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def _output(*candidates) -> CompletionOutput:
    """A round's output for one beam whose candidates are (token, logprob) pairs."""
    return CompletionOutput(0, "", [candidates[0][0]], "length",
                            logprobs=[{token: Logprob(logprob) for token, logprob in candidates}])


def test_the_rounds_by_hand():
    """Prompt [1, 1] (length 2), EOS 0, width 2, length penalty 1: scores are cum_logprob / len(tokens), the
    prompt's tokens counted and a final EOS not, as vLLM scores them."""
    search = BeamSearch([1, 1], BeamSearchParams(2, 2), eos_ids={0}, rounds=2)
    search.advance([_output((5, -1.0), (6, -1.5), (0, -0.5), (7, -3.0))])
    # EOS at -0.5 is complete (score -0.5 / 2); the best two others live on: 5 (-1/3), 6 (-1.5/3).
    assert [b.tokens for b in search.completed] == [[1, 1, 0]] and search.completed[0].finish_reason == "stop"
    assert [b.tokens for b in search.live] == [[1, 1, 5], [1, 1, 6]]
    search.advance([_output((8, -2.0), (9, -2.5)), _output((8, -0.1), (0, -0.2))])
    # Candidates: [5, 8] -3.0, [5, 9] -3.5, [6, 8] -1.6; [6, 0] -1.7 is complete.
    assert [b.tokens[2:] for b in search.beams] == [[6, 8], [5, 8]] and not search.beams[0].finish_reason
    assert search.rounds_left == 0 and search.live == []  # the rounds are done
    # Scores: [0] -0.5/2 = -0.25, [6, 0] -1.7/3 = -0.567, [6, 8] -1.6/4 = -0.4, [5, 8] -3.0/4 = -0.75.
    best = search.best()
    assert [b.tokens[2:] for b in best] == [[0], [6, 8]]
    assert [b.finish_reason for b in best] == ["stop", "length"]
    answer = search.request_output("r", "p", lambda ids: ",".join(map(str, ids)))
    assert [(o.text, o.token_ids) for o in answer.outputs] == [("", [0]), ("6,8", [6, 8])]
    assert answer.outputs[1].cumulative_logprob == pytest.approx(-1.6) and answer.prompt_token_ids == [1, 1]
    kept = BeamSearch([1, 1], BeamSearchParams(1, 1, include_stop_str_in_output=True), eos_ids={0}, rounds=1)
    kept.advance([_output((0, -0.1), (4, -0.2))])
    assert kept.request_output("r", "p", lambda ids: ",".join(map(str, ids))).outputs[0].text == "0"


@pytest.fixture(scope="module")
def offline(live):
    return LLM(engine=ENGINE)  # the embedded model, as the live server serves it


def test_use_beam_search_through_the_client(live, offline):
    """Completions and chat, streamed and not, answer the offline search's beams as n choices, best first."""
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    beam = {"use_beam_search": True, "return_token_ids": True}
    out = client.completions.create(model="tiny", prompt="The king", n=3, max_tokens=6, temperature=0,
                                    extra_body=beam)
    [expected] = offline.beam_search("The king", BeamSearchParams(3, 6))
    prompt_len = len(out.choices[0].model_extra["prompt_token_ids"])
    assert [c.model_extra["token_ids"] for c in out.choices] == [b.tokens[prompt_len:] for b in expected.sequences]
    assert [c.index for c in out.choices] == [0, 1, 2] and len({c.text for c in out.choices}) == 3
    assert out.usage.completion_tokens == 18
    chunks = list(client.completions.create(model="tiny", prompt="The king", n=3, max_tokens=6, temperature=0,
                                            stream=True, extra_body=beam))
    assert sorted((c.index, c.text) for chunk in chunks for c in chunk.choices) == \
        [(c.index, c.text) for c in out.choices]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=5, extra_body=beam)
    ids = offline.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    [expected] = offline.beam_search({"prompt_token_ids": offline.tokenizer.encode(ids, add_special_tokens=False)},
                                     BeamSearchParams(2, 5, temperature=1.0))
    assert [c.model_extra["token_ids"] for c in chat.choices] == [b.tokens[-5:] for b in expected.sequences]
    live.wait_idle()


@pytest.mark.parametrize("field, value", [("n", 11), ("stop", ["x"]), ("echo", True), ("top_p", 0.5),
                                          ("response_format", {"type": "json_object"}), ("length_penalty", "1")])
def test_what_beam_search_cannot_honour_is_400(live, field, value):
    body = {"prompt": "a", "max_tokens": 3, "use_beam_search": True, field: value}
    if field == "response_format":
        body.pop("prompt")
        body["messages"] = [{"role": "user", "content": "a"}]
    route = "chat/completions" if "messages" in body else "completions"
    answer = httpx.post(f"{live.url}/v1/{route}", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field
    live.wait_idle()


def test_a_client_that_leaves_mid_search_leaves_nothing_running(live):
    """The search stops with it (its round's requests aborted, no round after): every page and slot comes back,
    long before its 200 rounds of 4 beams could have run."""
    body = {"prompt": "The king", "n": 4, "max_tokens": 200, "use_beam_search": True, "ignore_eos": True}
    for stream in (False, True):
        before = live.engine.stats()
        with pytest.raises(httpx.TimeoutException):
            with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": stream},
                              timeout=0.5) as answer:
                answer.read()
        live.wait_idle(timeout=30)
        assert live.engine.stats().generation_tokens - before.generation_tokens < 4 * 200 // 2
