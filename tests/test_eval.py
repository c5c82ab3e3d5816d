"""`jaxinfer eval`: scores against transformers, generate against `LLM.generate`, resume after a kill, bad input.

Scores use a tiny random llama2 checkpoint (token ids; the reference is torch float64 over the same windows);
text and generate use the embedded default model. Every engine here, in process or from the command line
(in process through `cli.main`), has the same small config, so the compiled steps are shared.
"""

import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import build
from jaxinfer import cli
from jaxinfer import eval as evaluation
from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(max_slots=4, page_size=8, prefill_chunk=32, max_model_len=128, dtype="float32")
SMALL_FLAGS = ["--max-num-seqs", "4", "--page-size", "8", "--prefill-chunk", "32", "--max-model-len", "128",
               "--dtype", "float32"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama2")
    model = build("llama2", directory).double()
    return directory, model, LLM(directory, EngineConfig(**SMALL))


@pytest.fixture(scope="module")
def llm():
    return LLM(engine=EngineConfig(**SMALL))


@pytest.fixture
def cli_on(monkeypatch):
    """`cli.main` on an already loaded embedded model (loading it takes seconds), checking the flags' config."""
    def use(llm):
        def load(model, engine_config=None):
            assert model is llm or (model is None and engine_config == EngineConfig(**SMALL))
            return llm
        monkeypatch.setattr(evaluation, "load_llm", load)
    return use


def torch_logprobs(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Entry t - 1: log p(ids[t] | ids[:t]) in float64, and whether ids[t] was the argmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    target = torch.tensor(ids[1:])
    return logp.gather(-1, target[:, None])[:, 0].numpy(), (logp.argmax(-1) == target).numpy()


def hf_guide_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The loop of Hugging Face's perplexity guide, its label masking written as the first scored position."""
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end  # labels before end - trg_len are -100; the window's first token has no label
        spans.append((begin, end, max(end - trg_len, begin + 1)))
        prev_end = end
        if end == n:
            break
    return [span for span in spans if span[2] < span[1]]


# --- perplexity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("window, stride", [(64, 24), (40, 39)])
def test_perplexity_matches_transformers_over_sliding_windows(hf, window, stride):
    _, model, llm = hf
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 256, n).tolist() for n in (300, 40, 1, 2)]
    result = evaluation.perplexity(llm, docs, window, stride, use_tqdm=False)
    expected = [(d, *span) for d, ids in enumerate(docs) for span in hf_guide_windows(len(ids), window, stride)]
    assert [(w.document, w.start, w.end, w.scored_from) for w in result.windows] == expected
    for d, ids in enumerate(docs):  # every token but the first scored exactly once
        scored = sorted(t for w in result.windows if w.document == d for t in range(w.scored_from, w.end))
        assert scored == list(range(1, len(ids)))
    nll = 0.0
    for w in result.windows:
        ref = torch_logprobs(model, docs[w.document][w.start:w.end])[0][w.scored_from - w.start - 1:]
        assert abs(w.logprob - ref.sum()) < ATOL, w
        nll -= ref.sum()
    assert result.tokens == 299 + 39 + 1 and result.bytes is None and result.bits_per_byte is None
    assert abs(result.mean_nll - nll / result.tokens) < ATOL
    assert math.isclose(result.perplexity, math.exp(nll / result.tokens), rel_tol=ATOL)


def test_perplexity_window_defaults_and_errors(hf):
    llm = hf[2]
    result = evaluation.perplexity(llm, [list(range(3, 40))], use_tqdm=False)
    assert (result.window, result.stride) == (127, 63)  # max_model_len - 1, half of it
    for window, stride, field in ((128, 10, "window=128"), (64, 64, "stride=64"), (64, 0, "stride=0")):
        with pytest.raises(ValueError, match=field):
            evaluation.perplexity(llm, [list(range(3, 200))], window, stride, use_tqdm=False)
    with pytest.raises(ValueError, match="document 2: token id 300"):
        evaluation.perplexity(llm, [[3, 4, 5], [3, 300]], use_tqdm=False)


def test_perplexity_command_on_text(llm, cli_on, tmp_path, capsys):
    """The command line agrees with the Python API; bits per byte count the text's UTF-8 bytes."""
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "Ünïcödé bytes count as bytes."
    (tmp_path / "doc.txt").write_text(text)
    direct = evaluation.perplexity(llm, [text], 16, 8, use_tqdm=False)
    cli_on(llm)
    assert cli.main(["eval", "perplexity", "--input", str(tmp_path / "doc.txt"), "--window", "16", "--stride", "8",
                     "--json", str(tmp_path / "ppl.json"), *SMALL_FLAGS]) == 0
    table = capsys.readouterr().out
    saved = json.loads((tmp_path / "ppl.json").read_text())
    assert saved["tokens"] == direct.tokens == len(llm.tokenizer.encode(text)) - 1 and saved["windows"] > 2
    assert saved["bytes"] == len(text.encode("utf-8")) > len(text)
    assert abs(saved["nll"] - direct.nll) < ATOL and f"{direct.perplexity:.4f}" in table
    assert math.isclose(saved["bits_per_byte"], direct.nll / math.log(2) / saved["bytes"], rel_tol=1e-6)
    words = len(re.split(r"\s+", text))  # lm-eval's count_words, as its word_perplexity divides by
    assert saved["words"] == words and "word perplexity" in table
    assert math.isclose(saved["word_perplexity"], math.exp(direct.nll / words), rel_tol=1e-9)
    assert math.isclose(saved["byte_perplexity"], math.exp(direct.nll / saved["bytes"]), rel_tol=1e-9)
    llm.engine.check_idle()
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": text}) + "\n\n" + json.dumps({"text": [5, 6]}) + "\n")
    assert evaluation.read_documents(tmp_path / "docs.jsonl") == [text, [5, 6]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"txt": text}) + "\n")
    with pytest.raises(ValueError, match="line 2: expected {"):
        evaluation.read_documents(tmp_path / "bad.jsonl")


# --- loglikelihood --------------------------------------------------------------------------------


def greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_loglikelihood_matches_transformers(hf, tmp_path, capsys):
    directory, model, llm = hf
    rng = np.random.RandomState(1)
    contexts = [rng.randint(3, 256, n).tolist() for n in (5, 17, 40)]
    greedy = greedy_continuation(model, contexts[1], 6)
    off = greedy[:3] + [greedy[3] % 250 + 4] + greedy[4:]  # one token off the greedy path
    pairs = [(contexts[0], rng.randint(3, 256, 4).tolist()), (contexts[1], greedy), (contexts[1], off),
             (contexts[2], [7])]
    results = evaluation.loglikelihood(llm, [{"context": c, "continuation": t} for c, t in pairs], use_tqdm=False)
    for (context, continuation), result in zip(pairs, results):
        logprobs, is_argmax = torch_logprobs(model, context + continuation)
        n = len(continuation)
        assert result.tokens == n and abs(result.logprob - logprobs[-n:].sum()) < ATOL
        assert result.is_greedy == bool(is_argmax[-n:].all())
    assert [r.is_greedy for r in results[:3]] == [False, True, False]
    # The command line, loading the checkpoint by path: the same numbers, in input order, ids echoed.
    lines = [json.dumps({"id": f"q{i}", "context": c, "continuation": t}) for i, (c, t) in enumerate(pairs)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    assert cli.main(["eval", "loglikelihood", "--input", str(tmp_path / "pairs.jsonl"), "--output",
                     str(tmp_path / "ll.jsonl"), "--model", str(directory), *SMALL_FLAGS]) == 0
    saved = [json.loads(line) for line in (tmp_path / "ll.jsonl").read_text().splitlines()]
    assert [s["id"] for s in saved] == [f"q{i}" for i in range(len(pairs))]
    for s, r in zip(saved, results):
        assert abs(s["logprob"] - r.logprob) < 1e-6 and s["is_greedy"] == r.is_greedy and s["tokens"] == r.tokens
    (tmp_path / "bad.jsonl").write_text(lines[0] + '\n{"context": [5]}\n' + json.dumps(
        {"context": [5], "continuation": list(range(3, 200))}) + "\n")
    assert cli.main(["eval", "loglikelihood", "--input", str(tmp_path / "bad.jsonl"), "--model", str(directory),
                     *SMALL_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "line 2: expected {" in err and "line 3: the continuation has 197 tokens" in err


def test_loglikelihood_truncates_long_contexts_from_the_left():
    context, continuation = list(range(3, 203)), [7, 8, 9]
    assert evaluation._pair_ids((context, continuation), None, 128) == ((context + continuation)[-127:], 3)
    with pytest.raises(ValueError, match="the continuation has 127 tokens; at most 126 fit"):
        evaluation._pair_ids(([5], list(range(3, 130))), None, 128)


class NoBosTokenizer:
    """A tokenizer that adds no BOS and has none; EOS ids as a checkpoint may list them (generation config first)."""
    bos_id, eos_id, eos_ids = None, 7, (9, 7)

    @staticmethod
    def encode(text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_loglikelihood_empty_context_is_the_harness_prefix_token():
    # lm-eval's prefix_token_id: the tokenizer's bos_token_id, else its eos_token_id (not another EOS id)
    assert evaluation._encode_pair("", "ab", NoBosTokenizer) == ([7, 97, 98], 2)
    assert evaluation._encode_pair("  ", "b", NoBosTokenizer) == ([7, 32, 32, 98], 3)


def test_loglikelihood_tokenizes_text_as_the_harness(llm):
    tok = llm.tokenizer
    results = evaluation.loglikelihood(llm, [("The capital of France is", " Paris"), ("The capital of France is ",
                                             "Paris"), ("", "Hello world")], use_tqdm=False)
    whole, context = tok.encode("The capital of France is Paris"), tok.encode("The capital of France is")
    by_ids = evaluation.loglikelihood(llm, [(context, whole[len(context):]), ([tok.bos_id], tok.encode("Hello world",
                                      add_special_tokens=False))], use_tqdm=False)
    assert results[0] == results[1] == by_ids[0]  # a trailing space moves to the continuation
    assert results[0].tokens == len(whole) - len(context) and results[2] == by_ids[1]


# --- generate -------------------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_generate_matches_llm_generate(llm, tmp_path):
    chat = [{"role": "user", "content": "Hi"}]
    requests = [{"id": "a", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0},
                {"id": 7, "prompt": [5, 6, 7, 8, 9], "max_tokens": 5, "temperature": 0, "ignore_eos": True},
                {"id": "chat", "messages": chat, "max_tokens": 9, "temperature": 0.0, "meta": "ignored"},
                {"id": "seeded", "prompt": "Hello", "max_tokens": 10, "temperature": 0.8, "seed": 3, "top_k": 50}]
    report = evaluation.generate(llm, requests, tmp_path / "out.jsonl", use_tqdm=False)
    assert (report.total, report.generated, report.resumed, report.skipped) == (4, 4, 0, [])
    rendered = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat), add_special_tokens=False)
    prompts = ["Once upon a time", [5, 6, 7, 8, 9], rendered, "Hello"]
    params = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0), SamplingParams(max_tokens=10, temperature=0.8, seed=3, top_k=50)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    saved = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [s["id"] for s in saved] == ["a", 7, "chat", "seeded"]
    for s, out in zip(saved, expected):
        c = out.outputs[0]
        assert s == {"id": s["id"], "text": c.text, "prompt_tokens": len(out.prompt_token_ids),
                     "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
    assert saved[1]["completion_tokens"] == 5 and saved[0]["text"]


def test_generate_stops_at_until_and_leaves_the_engine_idle(llm, tmp_path):
    """A stop string ends the text before it (as the harness's `until`), and no step is left in flight."""
    greedy = dict(max_tokens=30, temperature=0, ignore_eos=True)
    full = llm.generate(["Jesus wept"], SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].text
    stop = full[10:13]
    evaluation.generate(llm, [{"id": 0, "prompt": "Jesus wept", "stop": [stop], **greedy}], tmp_path / "out.jsonl",
                        use_tqdm=False)
    saved = json.loads((tmp_path / "out.jsonl").read_text())
    assert saved["text"] == full[:full.index(stop)] and saved["finish_reason"] == "stop"
    llm.engine.check_idle()


def test_unseeded_sampling_depends_only_on_the_id(llm, tmp_path):
    """A request without a seed samples the same in any run (a resumed one included), whatever else runs."""
    sampled = {"id": "s", "prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    others = [{"id": f"o{i}", "prompt": f"Other {i}", "max_tokens": 12, "temperature": 1.0} for i in range(5)]
    evaluation.generate(llm, [sampled], tmp_path / "alone.jsonl", use_tqdm=False)
    evaluation.generate(llm, others + [{**sampled, "seed": None}], tmp_path / "among.jsonl", use_tqdm=False)
    alone = json.loads((tmp_path / "alone.jsonl").read_text())
    assert alone == json.loads((tmp_path / "among.jsonl").read_text().splitlines()[-1])
    evaluation.generate(llm, [{**sampled, "id": "t"}], tmp_path / "other_id.jsonl", use_tqdm=False)
    assert json.loads((tmp_path / "other_id.jsonl").read_text())["text"] != alone["text"]


def test_generate_reports_malformed_lines(llm, cli_on, tmp_path, capsys):
    good = {"id": "g1", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    lines = [good, "{not json", {"prompt": "x"}, {"id": "a"}, {**good, "prompt": "again"},
             {"id": "t", "prompt": "x", "temperature": -1}, {"id": "long", "prompt": list(range(5, 205))},
             {"id": "n", "prompt": "x", "n": 2}, {"id": "g2", "prompt": "Bye", "max_tokens": 3, "temperature": 0}]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    with source.open("a") as f:
        f.write("\n")  # blank lines are not requests
    out = tmp_path / "out.jsonl"
    cli_on(llm)
    assert cli.main(["eval", "generate", "--input", str(source), "--output", str(out), "--on-error", "stop",
                     *SMALL_FLAGS]) == 2
    err = capsys.readouterr().err
    assert not out.exists() and "7 malformed input line(s)" in err and "nothing was run" in err
    for n, what in ((2, "not valid JSON"), (3, 'missing "id"'), (4, 'give exactly one of "prompt"'), (5, "duplicate id 'g1' (first on "
                    "line 1)"), (6, "temperature"), (7, "the prompt has 200 tokens"), (8, "'n' is not supported")):
        assert f"line {n}: {what}" in err
    report = evaluation.generate(llm, source, out, use_tqdm=False)
    assert len(report.skipped) == 7 and report.total == report.generated == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["g1", "g2"]
    assert "line 7: the prompt has 200 tokens" in capsys.readouterr().err


def kill_when_written(process, path: Path, lines: int) -> None:
    while process.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            process.kill()
        time.sleep(0.01)


def test_generate_resumes_after_a_kill(llm, cli_on, tmp_path, capsys):
    """The command killed mid-run, a torn line appended (a write cut short), the command re-run: the file ends
    byte-identical to an uninterrupted run's. The killed run is a process of its own; the re-run, to save
    loading and compiling again, runs `cli.main` here."""
    requests = [{"id": f"r{i}", "prompt": f"Request {i}: a robot", "max_tokens": 8 + i % 9,
                 "temperature": 0} for i in range(40)]
    source = write_jsonl(tmp_path / "in.jsonl", requests)
    out = tmp_path / "out.jsonl"
    args = ["eval", "generate", "--input", str(source), "--output", str(out), *SMALL_FLAGS]
    first = subprocess.Popen([sys.executable, "-m", "jaxinfer.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    killer = threading.Thread(target=kill_when_written, args=(first, out, 5))
    killer.start()  # the uninterrupted run goes on meanwhile, here
    evaluation.generate(llm, source, tmp_path / "uninterrupted.jsonl", use_tqdm=False)
    killer.join(timeout=120)
    assert first.wait(timeout=10) == -9, "the first run ended before it was killed"
    done = out.read_bytes().count(b"\n")
    assert 5 <= done < 40
    with out.open("a") as f:
        f.write('{"id": "r39", "text": "half a li')
    cli_on(llm)
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "dropped 1 incomplete line(s)" in err and f"{done} already there" in err
    assert out.read_bytes() == (tmp_path / "uninterrupted.jsonl").read_bytes()
