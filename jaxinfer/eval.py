"""`jaxinfer eval`: offline generation, perplexity and log-likelihood runs through the continuous-batching engine.

This module owns the eval input formats (JSONL prompts, text documents, context/continuation pairs), how each
item becomes engine requests, and how results are written (a resumable JSONL file for `generate`). Everything
runs through `LLM.engine` (`add_request` + `step`) with many requests in flight; scores come from prompt
logprobs (`SamplingParams(prompt_logprobs=0)`), so this module must not touch the model, the runner or the
engine's internals. JAX and the engine are imported inside the run functions so that `import jaxinfer.cli`
stays light.

Python entry points, each taking an `LLM` or a model path: `generate(model, inputs, output)`,
`perplexity(model, documents)`, `loglikelihood(model, pairs)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from jaxinfer.config import DTYPES, HF_OVERRIDES_HELP, KV_CACHE_DTYPES, EngineConfig, json_object_arg
from jaxinfer.engine.request import SamplingParams

ON_ERROR = ("skip", "stop")
IN_FLIGHT_PER_SLOT = 4  # requests kept in the engine per slot: every slot stays busy, the queue stays short
ONE_COMPLETION_ONLY = ("n", "logprobs", "prompt_logprobs")  # an output line holds one completion's text
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in ONE_COMPLETION_ONLY)
SCORING = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


# --- shared: loading, input lines, running requests ----------------------------------------------


def load_llm(model, engine_config: EngineConfig | None = None):
    """An `LLM` as it is, or one loaded from a model path (None: the embedded default)."""
    from jaxinfer.llm import LLM
    if isinstance(model, LLM):
        if engine_config is not None:
            raise ValueError("engine_config applies only when a model path is given, not an LLM")
        return model
    return LLM(model, engine_config)


def _lines(source):
    """(label, raw item) per non-blank line of a JSONL file, or per item of a list (raw items: str or parsed)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            yield from ((f"line {n}", line) for n, line in enumerate(f, 1) if line.strip())
    else:
        yield from ((f"item {n}", item) for n, item in enumerate(source, 1))


def _object(raw) -> dict:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    return raw


def _run_requests(llm, requests):
    """Yield (key, finished RequestOutput) as each of `requests` ((key, prompt, params), ...) finishes,
    with up to IN_FLIGHT_PER_SLOT x max_slots of them in the engine at once."""
    engine = llm.engine
    if engine.running_in_background:
        raise RuntimeError("the engine's loop runs in a background thread: eval steps the engine itself")
    limit, pending, keys = IN_FLIGHT_PER_SLOT * llm.engine_config.max_slots, iter(requests), {}
    try:
        while True:
            for key, prompt, params in itertools.islice(pending, limit - len(keys)):
                keys[engine.add_request(prompt, params, stream=False)] = key
            if not keys:
                return
            for out in engine.step():
                if out.finished and out.request_id in keys:
                    yield keys.pop(out.request_id), out
    finally:  # the engine is left empty: a caller that stops early aborts the rest, and the step the engine
        # dispatched before reading that the last request had finished (a stop string, EOS) is read
        for request_id in keys:
            engine.abort(request_id)
        while engine.has_work():
            engine.step()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req", disable=not enabled)


# --- generate -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    id: str | int
    prompt: list[int]
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerateReport:
    total: int  # well-formed input lines, each with a line in the output
    generated: int  # run now
    resumed: int  # already in the output file
    skipped: list[str]  # one message per malformed input line
    completion_tokens: int  # generated now
    seconds: float


def _key(job_id) -> str:
    return json.dumps(job_id)


def _seed(job_id) -> int:
    # Unseeded requests would draw seeds from the engine's generator in submission order, which a resumed run
    # changes: a seed from the id makes a resumed run sample what an uninterrupted one would.
    return int.from_bytes(hashlib.blake2b(_key(job_id).encode(), digest_size=8).digest(), "little") >> 1


def _sampling_params(record: dict, job_id) -> SamplingParams:
    unsupported = [name for name in ONE_COMPLETION_ONLY if name in record]
    if unsupported:
        raise ValueError(f"{unsupported[0]!r} is not supported by eval generate (one completion per line)")
    fields = {name: record[name] for name in SAMPLING_FIELDS if name in record}
    if fields.get("seed") is None:
        fields["seed"] = _seed(job_id)
    try:
        return SamplingParams(**fields)
    except TypeError as error:
        raise ValueError(str(error)) from None


def _prompt(record: dict, tokenizer):
    """The prompt as the engine takes it: text or token ids, or chat messages rendered and encoded."""
    if ("prompt" in record) == ("messages" in record):
        raise ValueError('give exactly one of "prompt" (text or token ids) and "messages" (chat)')
    if "prompt" in record:
        return record["prompt"]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    if tokenizer is None:
        raise ValueError("chat messages need a tokenizer; this checkpoint has none (send token ids)")
    try:
        text = tokenizer.apply_chat_template(messages)
    except Exception as error:  # the template's own errors (jinja2, missing keys) come from the input
        raise ValueError(f"the chat template failed on these messages: {error}") from None
    return tokenizer.encode(text, add_special_tokens=False)  # the rendered text carries its own BOS


def _parse_job(label: str, raw, llm, seen: dict[str, str]) -> _Job:
    record = _object(raw)
    if "id" not in record:
        raise ValueError('missing "id"')
    job_id = record["id"]
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool):
        raise ValueError(f'"id" must be a string or an integer, got {job_id!r}')
    if _key(job_id) in seen:
        raise ValueError(f"duplicate id {job_id!r} (first on {seen[_key(job_id)]})")
    seen[_key(job_id)] = label
    params = _sampling_params(record, job_id)
    _, ids, _ = llm.engine.validate(_prompt(record, llm.tokenizer), params)  # length, vocabulary, stop strings
    return _Job(job_id, ids, params)


def _read_jobs(inputs, llm) -> tuple[list[_Job], list[str]]:
    jobs, problems, seen = [], [], {}
    for label, raw in _lines(inputs):
        try:
            jobs.append(_parse_job(label, raw, llm, seen))
        except (ValueError, MemoryError) as error:
            problems.append(f"{label}: {error}")
    return jobs, problems


def _dump(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _write_atomic(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_dump(r) for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse_result(line: str) -> dict | None:
    """An output line as written, or None for one a kill cut short (not a JSON object with an id)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "id" in record else None


def _load_done(path: Path, keys: set[str]) -> dict[str, dict]:
    """The results already in `path`, by id. Incomplete lines are dropped and the file rewritten without them,
    so appends start on a fresh line."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")  # a torn write may end inside a UTF-8 character
    *lines, tail = text.split("\n")  # tail: what follows the last newline, a torn write unless empty
    done, dropped = {}, int(tail != "")
    for line in lines:
        record = _parse_result(line)
        if record is None:
            dropped += line.strip() != ""
            continue
        if _key(record["id"]) not in keys:
            raise ValueError(f"{path} holds a result for id {record['id']!r}, which is not in the input: it was "
                             "written for other input; choose another --output")
        done[_key(record["id"])] = record
    if dropped:
        print(f"jaxinfer eval generate: dropped {dropped} incomplete line(s) of {path} (a write cut off by an "
              "interruption); their requests run again", file=sys.stderr)
        _write_atomic(path, done.values())
    return done


def _run_jobs(llm, jobs: list[_Job], output: Path, done: dict[str, dict], use_tqdm: bool) -> int:
    """Run `jobs`, appending each result to `output` as it finishes; returns the tokens generated."""
    tokens, start = 0, time.perf_counter()
    requests = ((job, job.prompt, job.params) for job in jobs)
    with open(output, "a", encoding="utf-8") as f, _progress(len(jobs), "generate", use_tqdm) as bar:
        for job, out in _run_requests(llm, requests):
            completion = out.outputs[0]
            record = {"id": job.id, "text": completion.text, "prompt_tokens": len(out.prompt_token_ids),
                      "completion_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}
            f.write(_dump(record))
            f.flush()
            done[_key(job.id)] = record
            tokens += len(completion.token_ids)
            bar.update(1)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tokens/s", refresh=False)
    return tokens


def generate(model, inputs, output, on_error: str = "skip", engine_config: EngineConfig | None = None,
             use_tqdm: bool = True) -> GenerateReport:
    """Complete every request of `inputs` (a JSONL path, or a list of dicts / JSON lines) into `output` (JSONL).

    A request: {"id": str or int, "prompt": text or token ids | "messages": [chat messages], and any
    SamplingParams fields except n, logprobs and prompt_logprobs}; other keys are ignored. Without a "seed"
    one is derived from the id (so a resumed run samples the same). Each result is appended as it finishes:
    {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}. Ids already in `output` are not
    run again (resume); when all are done the file is rewritten in input order, so an interrupted and
    resumed run ends byte-identical to an uninterrupted one. Malformed requests are reported on stderr with
    their line number and skipped (`on_error="skip"`) or raise ValueError before anything runs ("stop").
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    llm = load_llm(model, engine_config)
    jobs, problems = _read_jobs(inputs, llm)
    for problem in problems:
        print(f"jaxinfer eval generate: {problem}", file=sys.stderr)
    if problems and on_error == "stop":
        raise ValueError(f"{len(problems)} malformed input line(s), listed above; nothing was run "
                         "(--on-error skip runs the others)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _load_done(output, {_key(job.id) for job in jobs})
    todo = [job for job in jobs if _key(job.id) not in done]
    start = time.perf_counter()
    tokens = _run_jobs(llm, todo, output, done, use_tqdm)
    _write_atomic(output, [done[_key(job.id)] for job in jobs])
    return GenerateReport(len(jobs), len(todo), len(jobs) - len(todo), problems, tokens,
                          time.perf_counter() - start)


# --- perplexity ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """One engine request: tokens [start, end) of a document, scoring tokens [scored_from, end)."""

    document: int
    start: int
    end: int
    scored_from: int
    logprob: float  # summed over the scored tokens


@dataclasses.dataclass(frozen=True)
class Perplexity:
    window: int
    stride: int
    documents: int
    windows: list[Window]  # by document, then start
    tokens: int  # scored: every token of every document but its first
    nll: float  # summed negative log-likelihood (nats)
    bytes: int | None  # UTF-8 bytes of the documents; None where some were given as token ids
    words: int | None  # whitespace-separated words, as lm-eval counts them; None where some were token ids

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    @property
    def byte_perplexity(self) -> float | None:
        return math.exp(self.nll / self.bytes) if self.bytes else None

    @property
    def word_perplexity(self) -> float | None:
        return math.exp(self.nll / self.words) if self.words else None

    def summary(self) -> dict:
        return {"window": self.window, "stride": self.stride,
                "documents": self.documents, "windows": len(self.windows),
                "tokens": self.tokens, "bytes": self.bytes, "words": self.words, "nll": self.nll,
                "mean_nll": self.mean_nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "byte_perplexity": self.byte_perplexity, "word_perplexity": self.word_perplexity}


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored_from) per window, as Hugging Face's perplexity guide: windows of `window` tokens
    start every `stride` tokens; each scores the tokens the previous one did not reach (the first all but
    its first token), so every token but the document's first is scored exactly once."""
    if not 1 <= stride < window:
        raise ValueError(f"stride={stride} must be in [1, window={window}): each window must overlap the "
                         "previous one so that its first scored token has context")
    spans, prev_end = [], 0
    for start in range(0, num_tokens - 1, stride):
        end = min(start + window, num_tokens)
        spans.append((start, end, max(prev_end, start + 1)))
        if end == num_tokens:
            break
        prev_end = end
    return spans


def _window_and_stride(window: int | None, stride: int | None, max_model_len: int) -> tuple[int, int]:
    limit = max_model_len - 1  # the engine keeps one position for the token it samples after the prompt
    window = limit if window is None else window
    stride = max(window // 2, 1) if stride is None else stride
    if not 2 <= window <= limit:
        raise ValueError(f"window={window} must be in [2, {limit}]: max_model_len={max_model_len} less the one "
                         "position the engine keeps for a sampled token")
    return window, stride


def _document_ids(document, tokenizer) -> list[int]:
    if isinstance(document, str):
        if tokenizer is None:
            raise ValueError("text documents need a tokenizer; this checkpoint has none (send token ids)")
        return tokenizer.encode(document)
    if isinstance(document, list):
        return document
    raise ValueError(f"a document must be text or a list of token ids, got {type(document).__name__}")


def perplexity(model, documents, window: int | None = None, stride: int | None = None,
               engine_config: EngineConfig | None = None, use_tqdm: bool = True) -> Perplexity:
    """Token-level log-likelihood of `documents` (texts, encoded with the tokenizer's special tokens, or
    token-id lists), scored in sliding windows (`sliding_windows`) of `window` tokens (default
    max_model_len - 1) every `stride` tokens (default window // 2), each window its own engine request."""
    llm = load_llm(model, engine_config)
    window, stride = _window_and_stride(window, stride, llm.engine_config.max_model_len)
    documents, docs, requests = list(documents), [], []
    for index, document in enumerate(documents):
        try:
            docs.append(_document_ids(document, llm.tokenizer))
            for start, end, scored_from in sliding_windows(len(docs[-1]), window, stride):
                llm.engine.validate(docs[-1][start:end], SCORING)  # before anything runs
                requests.append(((index, start, end, scored_from), docs[-1][start:end], SCORING))
        except (ValueError, MemoryError) as error:
            raise type(error)(f"document {index + 1}: {error}") from None
    if not requests:
        raise ValueError("nothing to score: no document has two or more tokens")
    windows = []
    with _progress(len(requests), "perplexity", use_tqdm) as bar:
        for (index, start, end, scored_from), out in _run_requests(llm, requests):
            logprob = sum(lp.logprob for lp in _prompt_token_logprobs(out)[scored_from - start - 1:])
            windows.append(Window(index, start, end, scored_from, logprob))
            bar.update(1)
    windows.sort(key=lambda w: (w.document, w.start))
    texts = all(isinstance(d, str) for d in documents)
    # lm-eval's count_bytes and count_words (len(re.split(r"\s+", doc))), the denominators of its byte_perplexity,
    # bits_per_byte and word_perplexity
    nbytes = sum(len(d.encode("utf-8")) for d in documents) if texts else None
    words = sum(len(re.split(r"\s+", d)) for d in documents) if texts else None
    return Perplexity(window, stride, len(documents), windows, sum(w.end - w.scored_from for w in windows),
                      -sum(w.logprob for w in windows), nbytes, words)


def _prompt_token_logprobs(out) -> list:
    """The Logprob of each prompt token after the first, from a request run with prompt logprobs."""
    return [entry[token] for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]


def read_documents(path) -> list:
    """A .txt file is one document; a .jsonl file has one {"text": text or token ids} per line."""
    path = Path(path)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix != ".jsonl":
        raise ValueError(f"--input {path}: expected a .txt file (one document) or .jsonl (one {{\"text\"}} a line)")
    documents = []
    for label, raw in _lines(path):
        try:
            record = _object(raw)
            if not isinstance(record.get("text"), (str, list)):
                raise ValueError('expected {"text": text or token ids}')
        except ValueError as error:
            raise ValueError(f"{path}, {label}: {error}") from None
        documents.append(record["text"])
    return documents


# --- loglikelihood ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # summed over the continuation tokens
    is_greedy: bool  # every continuation token was the most likely one (rank 1)
    tokens: int  # continuation tokens


def _encode_pair(context: str, continuation: str, tokenizer) -> tuple[list[int], int]:
    if tokenizer is None:
        raise ValueError("text pairs need a tokenizer; this checkpoint has none (send token ids)")
    spaces = len(context) - len(context.rstrip())  # as the harness: a context's trailing spaces go to the continuation
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_len = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    if context_len == 0:  # an empty context and no BOS added: condition on a prefix token, as the harness does
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id  # transformers' eos_token_id
        if prefix is None:
            raise ValueError("the context is empty and the tokenizer has no BOS or EOS token to stand for it")
        return [prefix] + whole, len(whole)
    return whole, len(whole) - context_len


def _pair_ids(pair, tokenizer, max_model_len: int) -> tuple[list[int], int]:
    """-> (the prompt: context + continuation ids, the number of continuation tokens at its end)."""
    if isinstance(pair, dict):
        if "context" not in pair or "continuation" not in pair:
            raise ValueError('expected {"context": ..., "continuation": ...}')
        pair = (pair["context"], pair["continuation"])
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError("expected a (context, continuation) pair")
    context, continuation = pair
    if isinstance(context, str) and isinstance(continuation, str):
        ids, n = _encode_pair(context, continuation, tokenizer)
    elif isinstance(context, list) and isinstance(continuation, list):
        if not context:
            raise ValueError("the context is empty: give at least one token id (e.g. BOS)")
        ids, n = context + continuation, len(continuation)
    else:
        raise ValueError("context and continuation must both be text or both token-id lists")
    limit = max_model_len - 1  # positions the prompt may take: the engine keeps one for a sampled token
    if n < 1:
        raise ValueError("the continuation is empty after tokenization")
    if n >= limit:
        raise ValueError(f"the continuation has {n} tokens; at most {limit - 1} fit beside one context token "
                         f"in max_model_len={max_model_len}")
    return ids[-limit:], n  # a context too long loses tokens from the left, as in the harness


def loglikelihood(model, pairs, engine_config: EngineConfig | None = None,
                  use_tqdm: bool = True) -> list[Loglikelihood]:
    """log p(continuation | context) per pair, in order: pairs are a JSONL path, or a list of
    {"context", "continuation"} dicts or (context, continuation) tuples, each text or token-id lists.

    Text is tokenized as lm-evaluation-harness does: trailing whitespace of the context moves to the
    continuation, and the continuation tokens are encode(context + continuation)[len(encode(context)):]
    (not encoded separately), with the tokenizer's special tokens kept (BOS for Llama-family tokenizers: the
    harness's add_bos_token=True); an empty context is conditioned on BOS, else EOS (the
    tokenizer's eos_token, as the harness's prefix_token_id). A context too long for
    max_model_len - 1 tokens loses tokens from the left, as in the harness. Each pair is one engine request
    with prompt logprobs; `is_greedy` means every continuation token had rank 1."""
    llm = load_llm(model, engine_config)
    requests, problems = [], []
    for index, (label, raw) in enumerate(_lines(pairs)):
        try:
            ids, n = _pair_ids(_object(raw) if isinstance(raw, str) else raw, llm.tokenizer,
                               llm.engine_config.max_model_len)
            llm.engine.validate(ids, SCORING)
            requests.append(((index, n), ids, SCORING))
        except (ValueError, MemoryError) as error:
            problems.append(f"{label}: {error}")
    if problems:
        raise ValueError("malformed pairs, nothing was run:\n" + "\n".join(problems))
    results = [None] * len(requests)
    with _progress(len(requests), "loglikelihood", use_tqdm) as bar:
        for (index, n), out in _run_requests(llm, requests):
            scored = _prompt_token_logprobs(out)[-n:]
            results[index] = Loglikelihood(sum(lp.logprob for lp in scored), all(lp.rank == 1 for lp in scored), n)
            bar.update(1)
    return results


# --- the command line ---------------------------------------------------------------------------


def _engine_config(args) -> EngineConfig:
    return EngineConfig(max_slots=args.max_num_seqs, max_model_len=args.max_model_len, page_size=args.page_size,
                        prefill_chunk=args.prefill_chunk, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                        hf_overrides=args.hf_overrides)


def _input(args) -> Path:
    path = Path(args.input)
    if not path.is_file():
        raise ValueError(f"--input {path}: no such file")
    return path


def _cli_generate(args) -> None:
    report = generate(args.model, _input(args), args.output, args.on_error, _engine_config(args))
    rate = report.completion_tokens / report.seconds if report.seconds else 0.0
    print(f"jaxinfer eval generate: {report.total} results in {args.output}: {report.generated} generated now "
          f"({report.completion_tokens} tokens in {report.seconds:.1f}s, {rate:.1f} tokens/s), {report.resumed} "
          f"already there; {len(report.skipped)} malformed input line(s) skipped", file=sys.stderr)


def _cli_perplexity(args) -> None:
    result = perplexity(args.model, read_documents(_input(args)), args.window, args.stride, _engine_config(args))
    summary = result.summary()
    rows = [("documents", summary["documents"]), ("windows", f"{result.window} tokens every {result.stride}, "
                                                           f"{summary['windows']} in all"),
            ("tokens scored", summary["tokens"]), ("bytes", "-" if result.bytes is None else result.bytes),
            ("mean NLL (nats)", f"{result.mean_nll:.4f}"), ("perplexity", f"{result.perplexity:.4f}"),
            ("bits per byte", "-" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"),
            ("word perplexity", "-" if result.word_perplexity is None else f"{result.word_perplexity:.4f}")]
    for name, value in rows:
        print(f"{name:<16} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "input": args.input, **summary}, indent=2) + "\n")


def _cli_loglikelihood(args) -> None:
    results = loglikelihood(args.model, _input(args), _engine_config(args))
    records = [_object(raw) for _, raw in _lines(args.input)]  # all well-formed, or loglikelihood raised
    out = [{**({"id": r["id"]} if "id" in r else {}), **dataclasses.asdict(result)}
           for r, result in zip(records, results)]
    if args.output:
        _write_atomic(Path(args.output), out)
    else:
        sys.stdout.writelines(_dump(r) for r in out)
    print(f"jaxinfer eval loglikelihood: {len(results)} pairs, summed logprob {sum(r.logprob for r in results):.4f}, "
          f"{sum(r.is_greedy for r in results)} greedy", file=sys.stderr)


def _add_engine_flags(p) -> None:
    p.add_argument("--model", default=None, help="a Hugging Face checkpoint directory, a `jaxinfer convert` "
                   "output, or a config .json (random weights); default: the embedded model")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_slots, help="decode slots")
    p.add_argument("--max-model-len", type=int, default=None, help="default: min(the model's, 4096)")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size)
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    p.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="the KV cache's dtype: auto (the model's), bfloat16, fp8 (fp8_e4m3) or fp8_e5m2")
    p.add_argument("--hf-overrides", type=json_object_arg, default=None, help=HF_OVERRIDES_HELP)


def add_parser(sub) -> None:
    """Register `eval` (generate, perplexity, loglikelihood) among the `jaxinfer` subcommands."""
    ev = sub.add_parser("eval", help="offline runs through the engine: generate, perplexity, loglikelihood")
    kinds = ev.add_subparsers(dest="eval_command", required=True)
    gen = kinds.add_parser(
        "generate", help="complete a JSONL file of requests, resumably",
        description='Each input line: {"id": string or integer, "prompt": text or token ids, or "messages": '
                    '[chat messages], and any SamplingParams fields (max_tokens, temperature, top_p, top_k, seed, '
                    'stop, ...) but n, logprobs and prompt_logprobs}. Without a seed, one is derived from the id. '
                    'Results are appended as each request finishes: {"id", "text", "prompt_tokens", '
                    '"completion_tokens", "finish_reason"}. Re-running with the same arguments skips the ids already '
                    'in --output; when all are done the file is rewritten in input order, so an interrupted and '
                    'resumed run ends byte-identical to an uninterrupted one.')
    gen.add_argument("--input", required=True, help="JSONL: one request per line")
    gen.add_argument("--output", required=True, help="JSONL results; ids already there are not run again")
    gen.add_argument("--on-error", choices=ON_ERROR, default="skip",
                     help="malformed input lines: skip them (default) or stop before running anything (exit 2)")
    _add_engine_flags(gen)
    gen.set_defaults(run=_cli_generate)

    ppl = kinds.add_parser(
        "perplexity", help="perplexity and bits per byte of documents, in sliding windows",
        description="Scores every token but each document's first, in windows of --window tokens starting every "
                    "--stride tokens, each scoring only what the previous one did not (Hugging Face's perplexity "
                    "guide); every window is one engine request. Texts are encoded with the tokenizer's special "
                    "tokens. Bits per byte = summed NLL / ln 2 / UTF-8 bytes of the texts; byte and word perplexity "
                    "= exp(summed NLL / bytes or words), words as lm-evaluation-harness counts them "
                    "(len(re.split(r'\\s+', text))).")
    ppl.add_argument("--input", required=True, help='a .txt file (one document) or .jsonl ({"text": ...} a line)')
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: max_model_len - 1)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    ppl.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    _add_engine_flags(ppl)
    ppl.set_defaults(run=_cli_perplexity)

    ll = kinds.add_parser(
        "loglikelihood", help="log p(continuation | context) and is_greedy per pair",
        description="Text pairs are tokenized as lm-evaluation-harness does: the context's trailing whitespace "
                    "moves to the continuation; continuation tokens = encode(context + continuation)"
                    "[len(encode(context)):], special tokens (BOS) kept. Output per line, in input order: "
                    '{"id" (if the input had one), "logprob", "is_greedy", "tokens"}.')
    ll.add_argument("--input", required=True, help='JSONL: {"context", "continuation"} per line, text or token ids')
    ll.add_argument("--output", default=None, help="JSONL results in input order (default: stdout)")
    _add_engine_flags(ll)
    ll.set_defaults(run=_cli_loglikelihood)
