"""Load generation against any OpenAI-compatible completions server: `jaxinfer bench serve`.

Owns: the synthetic workloads (random, prefix-sharing, jsonl), the arrival schedule, the streaming client that times
each request, and the metrics, defined and computed as vLLM's `vllm bench serve` does, so that figures taken from our
server, vLLM and llama.cpp compare. It measures from outside, over HTTP only: it must not import JAX or the engine.

Where we differ from vLLM, on purpose: a stream must end in data: [DONE] and an error event fails its request (vLLM
counts both as successes); without a usage chunk and without --tokenizer, output tokens are the chunks counted (vLLM
counts 1); without --tokenizer, prompts go as token ids (vLLM always sends text); ignore_eos is on for every dataset
(vLLM: for random) and temperature 0 is sent (vLLM: the server's default); all four metrics are reported at p90 and p99
(vLLM: TTFT, TPOT, ITL at p99); --save-result takes the file's path (vLLM: a flag, with --result-filename).

HTTP goes through httpx: a well-kept async client that streams responses (the openai client is built on it). httpx,
tqdm and matplotlib are imported where used, because the CLI builds this module's parser on every command.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

DATASETS = ("random", "prefix", "jsonl")
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                  "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
# Our defaults, wider than vLLM's (ttft,tpot,itl at 99): every metric at p90 and p99, the figures SERVING.md promises.
DEFAULT_PERCENTILE_METRICS = tuple(LATENCY_TITLES)
DEFAULT_METRIC_PERCENTILES = (90.0, 99.0)
PLOT_PERCENTILES = (50, 90, 99)
DEFAULT_VOCAB_SIZE = 1000  # of token-id prompts without --tokenizer: ids every model has
ERROR_CHARS = 500  # of a failed request's recorded error text
TIMEOUT_S, CONNECT_TIMEOUT_S = 6 * 3600.0, 60.0  # vLLM's client allows a request six hours
TEXT_PROMPT_TRIES = 10  # decode/re-encode rounds towards an exact token length, as vLLM


# --- options --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """One benchmark run; the fields are the CLI's options (vLLM's names where vLLM has one)."""
    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id that GET {base_url}/v1/models lists
    api_key: str | None = None
    num_prompts: int = 200
    request_rate: float = math.inf  # requests/s; inf sends all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    dataset_name: str = "random"
    dataset_path: str | None = None
    random_input_len: int = 128
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    prefix_len: int = 256
    num_prefixes: int = 10
    tokenizer: str | None = None
    min_token_id: int = 10
    vocab_size: int | None = None  # None: DEFAULT_VOCAB_SIZE, or the tokenizer's
    ignore_eos: bool = True
    temperature: float = 0.0
    goodput: dict[str, float] = dataclasses.field(default_factory=dict)  # SLOs in ms, keyed by SLO_METRICS
    percentile_metrics: tuple[str, ...] = DEFAULT_PERCENTILE_METRICS
    metric_percentiles: tuple[float, ...] = DEFAULT_METRIC_PERCENTILES
    save_result: str | None = None
    plot: str | None = None
    disable_tqdm: bool = False

    def __post_init__(self):
        _check_options(self)


def _require(ok: bool, option: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"{option} {value}: {want}")


def _check_options(o: ServeOptions) -> None:
    _require(o.base_url.startswith(("http://", "https://")), "--base-url", o.base_url, "need http(s)://HOST:PORT")
    _require(o.endpoint.startswith("/"), "--endpoint", o.endpoint, "need a path such as /v1/completions")
    _require(o.num_prompts >= 1, "--num-prompts", o.num_prompts, "need at least 1")
    _require(o.request_rate > 0, "--request-rate", o.request_rate, "need > 0 requests/s (inf: all at once)")
    _require(o.burstiness > 0, "--burstiness", o.burstiness, "need > 0 (1: Poisson arrivals)")
    _require(o.max_concurrency is None or o.max_concurrency >= 1, "--max-concurrency", o.max_concurrency,
             "need at least 1")
    _require(o.dataset_name in DATASETS, "--dataset-name", o.dataset_name, f"need one of {', '.join(DATASETS)}")
    _require(o.random_input_len >= 1, "--random-input-len", o.random_input_len, "need at least 1")
    _require(o.random_output_len >= 1, "--random-output-len", o.random_output_len, "need at least 1")
    _require(0 <= o.random_range_ratio < 1, "--random-range-ratio", o.random_range_ratio, "need a value in [0, 1)")
    _require(o.random_prefix_len >= 0, "--random-prefix-len", o.random_prefix_len, "need >= 0")
    _require(len(o.percentile_metrics) > 0 and set(o.percentile_metrics) <= set(LATENCY_TITLES),
             "--percentile-metrics", ",".join(o.percentile_metrics), f"need some of {','.join(LATENCY_TITLES)}")
    _require(len(o.metric_percentiles) > 0 and all(0 <= p <= 100 for p in o.metric_percentiles),
             "--metric-percentiles", ",".join(map(str, o.metric_percentiles)), "need numbers in [0, 100], e.g. 50,99")
    _require(o.prefix_len >= 1, "--prefix-len", o.prefix_len, "need at least 1")
    _require(o.num_prefixes >= 1, "--num-prefixes", o.num_prefixes, "need at least 1")
    _require(o.min_token_id >= 0, "--min-token-id", o.min_token_id, "need >= 0")
    _require(o.vocab_size is None or o.vocab_size > o.min_token_id, "--vocab-size", o.vocab_size,
             f"need more than --min-token-id {o.min_token_id}")
    _require(o.temperature >= 0, "--temperature", o.temperature, "need >= 0")
    if o.dataset_name == "jsonl":
        _require(o.dataset_path is not None, "--dataset-path", o.dataset_path, "--dataset-name jsonl needs a file")
        _require(Path(o.dataset_path).is_file(), "--dataset-path", o.dataset_path, "no such file")
    for key, ms in o.goodput.items():
        _require(key in SLO_METRICS and ms >= 0, "--goodput", f"{key}:{ms}",
                 f"need KEY:MS with KEY one of {', '.join(SLO_METRICS)} and MS >= 0")
    if o.plot is not None:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            raise ValueError(f"--plot {o.plot}: needs matplotlib (pip install matplotlib)") from None


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'50,99.9' -> (50.0, 99.9)."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles {text}: need comma-separated numbers, e.g. 50,90,99") from None


def parse_goodput(items: list[str]) -> dict[str, float]:
    """['ttft:300', 'tpot:50'] -> {'ttft': 300.0, 'tpot': 50.0}: SLOs in milliseconds."""
    slos = {}
    for item in items:
        key, _, ms = item.partition(":")
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        _require(key in SLO_METRICS and value >= 0 and key not in slos, "--goodput", item,
                 f"need KEY:MS once per KEY, KEY one of {', '.join(SLO_METRICS)}, MS a number >= 0 (e.g. ttft:300)")
        slos[key] = value
    return slos


# --- workloads ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str | list[int]  # text, or token ids (the completions API takes a list of ints)
    prompt_len: int | None  # tokens, when known without the server
    output_len: int  # sent as max_tokens


def sample_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator, at_least: int = 0) -> np.ndarray:
    """vLLM's: integers uniform in [floor(mean * (1 - r)), ceil(mean * (1 + r))], both bounds raised to `at_least`
    (vLLM raises output lengths' to 1)."""
    low = max(at_least, math.floor(mean * (1 - range_ratio)))
    high = max(at_least, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high, n, endpoint=True)


def text_prompt(tokenizer, ids: list[int], rng: np.random.Generator, low: int, high: int) -> tuple[str, int]:
    """-> (text, its token count): text that re-encodes to len(ids) tokens, made as vLLM makes it: decode, re-encode,
    trim or pad with random ids in [low, high), repeat; after TEXT_PROMPT_TRIES rounds the count may be a little off."""
    target = len(ids)
    text = tokenizer.decode(ids)
    actual = tokenizer.encode(text, add_special_tokens=False)
    for _ in range(TEXT_PROMPT_TRIES):
        if len(actual) == target:
            break
        ids = actual[:target] + rng.integers(low, high, max(0, target - len(actual))).tolist()
        text = tokenizer.decode(ids)
        actual = tokenizer.encode(text, add_special_tokens=False)
    return text, len(actual)


@dataclasses.dataclass(frozen=True)
class TokenSpace:
    """Where random prompts come from: ids uniform in [low, high), sent as ids, or as text with a tokenizer."""
    low: int
    high: int
    tokenizer: object | None = None

    def ids(self, n: int, rng: np.random.Generator) -> list[int]:
        return rng.integers(self.low, self.high, n).tolist()

    def run(self, n: int, start: int) -> list[int]:
        """n successive ids from `start`, wrapping within [low, high): vLLM's random prompts."""
        return (self.low + (start + np.arange(n)) % (self.high - self.low)).tolist()

    def special_tokens(self) -> int:
        """Tokens the server adds to a prompt: a text prompt's BOS and the like; none to token ids."""
        return len(self.tokenizer.encode("", add_special_tokens=True)) if self.tokenizer is not None else 0

    def request(self, ids: list[int], output_len: int, rng: np.random.Generator) -> Request:
        if self.tokenizer is None:
            return Request(ids, len(ids), int(output_len))
        return Request(*text_prompt(self.tokenizer, ids, rng, self.low, self.high), int(output_len))


def random_dataset(n: int, input_len: int, output_len: int, range_ratio: float, space: TokenSpace,
                   rng: np.random.Generator, prefix_len: int = 0) -> list[Request]:
    """vLLM's `random`: one random prefix of `prefix_len` tokens shared by all, then a run of successive ids from a
    random offset, its length drawn around `input_len` less the special tokens the server will add."""
    special = space.special_tokens()
    real_input_len = max(0, input_len - special)
    _require(prefix_len + math.floor(real_input_len * (1 - range_ratio)) >= 1, "--random-input-len", input_len,
             f"too short: with --random-prefix-len {prefix_len}, {special} special tokens and "
             f"--random-range-ratio {range_ratio} a prompt could be empty")
    inputs = sample_lengths(real_input_len, range_ratio, n, rng)
    outputs = sample_lengths(output_len, range_ratio, n, rng, at_least=1)
    offsets = rng.integers(0, space.high - space.low, n)
    prefix = space.ids(prefix_len, rng)
    return [space.request(prefix + space.run(length, offset + i), out, rng)
            for i, (length, out, offset) in enumerate(zip(inputs, outputs, offsets))]


def prefix_dataset(n: int, prefix_len: int, num_prefixes: int, input_len: int, output_len: int, range_ratio: float,
                   space: TokenSpace, rng: np.random.Generator) -> list[Request]:
    """Each prompt: one of `num_prefixes` shared random prefixes (used in turn, order shuffled) + a random suffix of
    about `input_len` tokens."""
    prefixes = [space.ids(prefix_len, rng) for _ in range(num_prefixes)]
    which = rng.permutation(n) % num_prefixes
    suffixes = sample_lengths(input_len, range_ratio, n, rng)
    outputs = sample_lengths(output_len, range_ratio, n, rng, at_least=1)
    return [space.request(prefixes[p] + space.ids(s, rng), o, rng) for p, s, o in zip(which, suffixes, outputs)]


def _jsonl_request(line: str, where: str, default_output_len: int, tokenizer) -> Request:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e})") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if isinstance(prompt, str):
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer else None
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        prompt_len = len(prompt)
    else:
        raise ValueError(f"{where}: need an object with 'prompt', a string or a list of token ids; got {line[:80]!r}")
    output_len = record.get("output_len", record.get("max_tokens", default_output_len))
    if type(output_len) is not int or output_len < 1:
        raise ValueError(f"{where}: output_len/max_tokens {output_len!r}: need a positive integer")
    return Request(prompt, prompt_len, output_len)


def jsonl_dataset(path: str, n: int, default_output_len: int, tokenizer=None) -> list[Request]:
    """The first `n` requests of a file of one JSON object per line (`prompt`, optional `output_len`/`max_tokens`,
    else `default_output_len`), cycling through the file if it holds fewer."""
    with open(path, encoding="utf-8") as f:
        records = [_jsonl_request(line, f"--dataset-path {path} line {i}", default_output_len, tokenizer)
                   for i, line in enumerate(f, 1) if line.strip()]
    if not records:
        raise ValueError(f"--dataset-path {path}: no requests; need one JSON object with 'prompt' per line")
    return [records[i % len(records)] for i in range(n)]


def load_tokenizer(o: ServeOptions):
    if o.tokenizer is None:
        return None
    from jaxinfer.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(o.tokenizer)


def build_dataset(o: ServeOptions, tokenizer=None) -> list[Request]:
    rng = np.random.default_rng([o.seed, 0])  # apart from the schedule's, so the rate does not change the prompts
    if o.dataset_name == "jsonl":
        return jsonl_dataset(o.dataset_path, o.num_prompts, o.random_output_len, tokenizer)
    high = o.vocab_size or (tokenizer.vocab_size if tokenizer else DEFAULT_VOCAB_SIZE)
    _require(o.min_token_id < high, "--min-token-id", o.min_token_id, f"need less than the vocabulary size {high}")
    space = TokenSpace(o.min_token_id, high, tokenizer)
    if o.dataset_name == "random":
        return random_dataset(o.num_prompts, o.random_input_len, o.random_output_len, o.random_range_ratio, space, rng,
                              o.random_prefix_len)
    return prefix_dataset(o.num_prompts, o.prefix_len, o.num_prefixes, o.random_input_len, o.random_output_len,
                          o.random_range_ratio, space, rng)


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start, as vLLM's get_request: every request, the first too, waits a gap drawn
    from a gamma distribution with shape `burstiness` and scale 1 / (rate * burstiness), a mean of 1 / rate
    (burstiness 1 is a Poisson process, below 1 burstier, above 1 steadier, infinite a constant 1 / rate); then the
    times are scaled so that the last is exactly n / rate, which vLLM does to steady throughput across seeds. An
    infinite rate sends everything at 0."""
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    times = np.cumsum(gaps)
    return times * (n / rate / times[-1]) if times[-1] > 0 else times


# --- timing one request ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequestResult:
    send_time: float  # seconds from the benchmark's start to sending
    ttft: float | None = None  # seconds from sending to the first chunk with a choice (its text may be empty)
    itl: tuple[float, ...] = ()  # seconds between successive such chunks, one per chunk however many tokens it holds
    e2el: float | None = None  # seconds from sending to the last such chunk (as vLLM: not to the usage or [DONE])
    output_tokens: int = 0  # usage.completion_tokens, else see StreamTimer.result
    prompt_tokens: int | None = None  # usage.prompt_tokens, else the workload's count
    error: str | None = None  # None: succeeded

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None for failed or one-token requests."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


class StreamTimer:
    """Times one streamed completion from the lines of its server-sent events, with vLLM's definitions: every event
    with a non-empty `choices` is a token's chunk, whether its text is empty (a held-back byte, a special token, a
    last chunk carrying only finish_reason) or not; TTFT ends at the first, one ITL per later one, E2EL at the last.
    Where we differ, deliberately: the stream must end in data: [DONE] and an error event fails the request (vLLM
    counts a cut stream, or one that reported an error after a chunk, as a success)."""

    def __init__(self, sent: float):
        self.sent = sent
        self.chunk_times: list[float] = []
        self.texts: list[str] = []
        self.usage: dict = {}
        self.done: float | None = None
        self.error: str | None = None

    def feed(self, line: str, now: float) -> bool:
        """Take one line received at `now`; True once the stream is over ([DONE], an error event, bad JSON)."""
        if not line.startswith("data:"):
            return False  # blank separators, ': comments', 'event:' names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = now
            return True
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
            event = None
        if not isinstance(event, dict):
            self.error = f"an event that is not a JSON object: {data}"
            return True
        if event.get("error"):
            self.error = f"error event: {json.dumps(event['error'])}"
            return True
        choices = event.get("choices")
        if isinstance(choices, list) and choices:
            self.chunk_times.append(now)
            text = choices[0].get("text") if isinstance(choices[0], dict) else None
            self.texts.append(text if isinstance(text, str) else "")
        elif isinstance(event.get("usage"), dict):  # as vLLM: usage is read from the chunk without choices
            self.usage = event["usage"]
        return False

    def result(self, start: float, prompt_len: int | None, count_tokens=None) -> RequestResult:
        """The request's record, `start` being the benchmark's start on the same clock. Output tokens: the usage
        chunk's completion_tokens; without one, `count_tokens(text)` (vLLM re-tokenizes the text), and without a
        tokenizer the number of chunks (where vLLM, lacking a tokenizer, counts 1)."""
        error = self.error
        if error is None and self.done is None:
            error = "the stream ended before data: [DONE]"
        if error is None and not self.chunk_times:
            error = "no chunk carried a choice"
        if error is not None:
            return RequestResult(self.sent - start, prompt_tokens=prompt_len, error=error[:ERROR_CHARS])
        times = self.chunk_times
        output_tokens = _count(self.usage.get("completion_tokens"))
        if not output_tokens:
            output_tokens = count_tokens("".join(self.texts)) if count_tokens else len(times)
        prompt_tokens = _count(self.usage.get("prompt_tokens"))
        if prompt_tokens is None:
            prompt_tokens = prompt_len
        return RequestResult(self.sent - start, times[0] - self.sent, tuple(b - a for a, b in zip(times, times[1:])),
                             times[-1] - self.sent, output_tokens, prompt_tokens)


def _count(value) -> int | None:
    """A token count a server reported, or None where it sent none or nonsense."""
    return value if type(value) is int and value >= 0 else None


def make_payload(o: ServeOptions, model: str, request: Request) -> dict:
    payload = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len,
               "temperature": o.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if o.ignore_eos:
        payload["ignore_eos"] = True  # a vLLM extension that ours and llama.cpp accept; only sent when wanted
    return payload


def _url(o: ServeOptions, path: str) -> str:
    return o.base_url.rstrip("/") + path


def _headers(o: ServeOptions) -> dict[str, str]:
    return {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}


async def send_request(client, url: str, headers: dict, payload: dict, prompt_len: int | None,
                       start: float, count_tokens=None) -> RequestResult:
    """POST one streaming completion and time it; every failure is recorded, none raised (as vLLM, which keeps any
    exception's text as the request's error), so one odd answer cannot end the run."""
    timer = StreamTimer(time.perf_counter())
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                timer.error = f"HTTP {response.status_code}: {body}"
            else:
                async for line in response.aiter_lines():
                    if timer.feed(line, time.perf_counter()):
                        break
    except Exception as e:  # httpx's, a decoder's or anything else: this request failed, not the run
        timer.error = f"{type(e).__name__}: {e}"
    return timer.result(start, prompt_len, count_tokens)


# --- the driver -----------------------------------------------------------------------------


async def first_model(client, o: ServeOptions) -> str:
    import httpx
    url = _url(o, "/v1/models")
    try:
        response = await client.get(url, headers=_headers(o))
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, OSError, ValueError, LookupError, TypeError) as e:
        raise ValueError(f"could not read a model id from GET {url} ({type(e).__name__}: {e}); pass --model") from e


async def _drive(o: ServeOptions, client, model: str, requests: list[Request], schedule: np.ndarray,
                 count_tokens=None) -> tuple[list[RequestResult], float]:
    """Send each request at its scheduled time (at most max_concurrency in flight) -> (results, duration)."""
    from tqdm import tqdm
    url, headers = _url(o, o.endpoint), _headers(o)
    gate = asyncio.Semaphore(o.max_concurrency) if o.max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc="requests", disable=o.disable_tqdm)

    async def one(request: Request) -> RequestResult:
        async with gate:  # as vLLM: a request's clock starts once it holds a slot
            result = await send_request(client, url, headers, make_payload(o, model, request), request.prompt_len,
                                        start, count_tokens)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for request, at in zip(requests, schedule):
        delay = start + at - time.perf_counter()  # from the start, so sleeps do not accumulate drift
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def _benchmark(o: ServeOptions, requests: list[Request], schedule: np.ndarray,
                     count_tokens=None) -> tuple[str, list[RequestResult], float]:
    import httpx
    connections = o.max_concurrency or o.num_prompts  # no request may wait for a connection: that would be timed
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = o.model or await first_model(client, o)
        url = _url(o, o.endpoint)
        # As vLLM: one untimed request first, which fails fast on a wrong URL or model and warms the server up.
        test = await send_request(client, url, _headers(o), make_payload(o, model, requests[0]),
                                  requests[0].prompt_len, time.perf_counter())
        if not test.success:
            raise ValueError(f"the test request to {url} (model {model!r}) failed, nothing was measured: {test.error}")
        results, duration = await _drive(o, client, model, requests, schedule, count_tokens)
    return model, results, duration


# --- metrics --------------------------------------------------------------------------------


def percentile_name(p: float) -> str:
    """vLLM's key for a percentile: p99, p99.9."""
    return f"p{int(p) if int(p) == p else p}"


def summarize(seconds, percentiles=DEFAULT_METRIC_PERCENTILES) -> dict[str, float]:
    """Mean, median, (population) std and the percentiles in milliseconds, numpy's linear percentiles; zeros when
    empty; all as vLLM."""
    ms = np.asarray(seconds, float) * 1000 if len(seconds) else np.zeros(1)
    stats = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    return stats | {percentile_name(p): float(np.percentile(ms, p)) for p in percentiles}


def peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """vLLM's (max_output_tokens_per_s, max_concurrent_requests): the most chunks received in one whole second
    counted from the first send, and the most requests in flight at once."""
    if not ok:
        return 0.0, 0
    first = min(r.send_time for r in ok)
    buckets = np.zeros(int(np.ceil(max(r.send_time + r.e2el for r in ok) - first)) + 1)
    for r in ok:
        times = r.send_time + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        np.add.at(buckets, np.clip((times - first).astype(int), 0, len(buckets) - 1), 1)
    events = sorted([(r.send_time, 1) for r in ok] + [(r.send_time + r.e2el, -1) for r in ok])  # ends first at ties
    return float(buckets.max()), int(np.cumsum([delta for _, delta in events]).max())


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO given; a one-token request's TPOT counts as 0, as vLLM."""
    seconds = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    return all(seconds[key] * 1000 <= ms for key, ms in slos_ms.items())


@dataclasses.dataclass(frozen=True)
class Metrics:
    """vLLM's serving metrics; throughputs are over `duration`, the first send to the last completion."""
    completed: int
    failed: int
    duration: float  # seconds
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # successful requests/s
    request_goodput: float | None  # requests/s meeting every SLO; None without SLOs
    output_throughput: float  # tokens/s
    total_token_throughput: float  # input + output tokens/s
    max_output_tokens_per_s: float  # see peaks()
    max_concurrent_requests: int
    latency_ms: dict[str, dict[str, float]]  # {metric: summarize(...)} for the --percentile-metrics

    def as_json(self) -> dict:
        """Flat, with vLLM's keys (mean_ttft_ms, p99_itl_ms, ...)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "latency_ms"}
        for metric, stats in self.latency_ms.items():
            flat.update({f"{stat}_{metric}_ms": value for stat, value in stats.items()})
        return flat


def compute_metrics(results: list[RequestResult], duration: float, slos_ms: dict[str, float],
                    metrics=DEFAULT_PERCENTILE_METRICS, percentiles=DEFAULT_METRIC_PERCENTILES) -> Metrics:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    values = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [gap for r in ok for gap in r.itl], "e2el": [r.e2el for r in ok]}
    latency = {metric: summarize(values[metric], percentiles) for metric in LATENCY_TITLES if metric in metrics}
    goodput = sum(meets_slos(r, slos_ms) for r in ok) / duration if slos_ms else None
    return Metrics(len(ok), len(results) - len(ok), duration, input_tokens, output_tokens, len(ok) / duration,
                   goodput, output_tokens / duration, (input_tokens + output_tokens) / duration, *peaks(ok), latency)


def format_report(m: Metrics) -> str:
    rows = [("Successful requests:", m.completed), ("Failed requests:", m.failed),
            ("Benchmark duration (s):", f"{m.duration:.2f}"), ("Total input tokens:", m.total_input_tokens),
            ("Total generated tokens:", m.total_output_tokens),
            ("Request throughput (req/s):", f"{m.request_throughput:.2f}")]
    if m.request_goodput is not None:
        rows.append(("Request goodput (req/s):", f"{m.request_goodput:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
             ("Peak output token throughput (tok/s):", f"{m.max_output_tokens_per_s:.2f}"),
             ("Peak concurrent requests:", f"{m.max_concurrent_requests:.2f}"),
             ("Total token throughput (tok/s):", f"{m.total_token_throughput:.2f}")]
    lines = [" Serving Benchmark Result ".center(50, "=")] + [f"{name:<40} {value}" for name, value in rows]
    for metric, stats in m.latency_ms.items():
        lines.append(f" {LATENCY_TITLES[metric]} ".center(50, "-"))
        for stat, value in stats.items():
            if stat != "std":  # as vLLM: in the JSON, not the report
                label = f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {metric.upper()} (ms):"
                lines.append(f"{label:<40} {value:.2f}")
    return "\n".join(lines + ["=" * 50])


# --- outputs --------------------------------------------------------------------------------


def sliding_percentiles(times, values, window: float, percentiles=PLOT_PERCENTILES) -> np.ndarray:
    """Row i: the percentiles of the values whose time lies in (times[i] - window, times[i]]; times ascending."""
    times, values = np.asarray(times, float), np.asarray(values, float)
    first = np.searchsorted(times, times - window, side="right")
    last = np.searchsorted(times, times, side="right")
    return np.array([np.percentile(values[a:b], percentiles) for a, b in zip(first, last)])


def write_plot(results: list[RequestResult], duration: float, path: str) -> None:
    """p50/p90/p99 of TTFT and E2EL over a trailing window of a tenth of the run, against send time."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    ok = sorted((r for r in results if r.success), key=lambda r: r.send_time)
    window = max(duration / 10, 1e-3)
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    sent = [r.send_time for r in ok]
    for ax, name in zip(axes, ("ttft", "e2el")):
        if ok:
            rows = sliding_percentiles(sent, [getattr(r, name) * 1000 for r in ok], window)
            for column, p in enumerate(PLOT_PERCENTILES):
                ax.plot(sent, rows[:, column], label=f"p{p}")
            ax.legend()
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("send time since start (s)")
    fig.suptitle(f"{len(ok)} successful requests; percentiles over a trailing {window:.2f} s window")
    fig.savefig(path, dpi=100)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    options: ServeOptions
    model: str
    metrics: Metrics
    results: list[RequestResult]

    def as_json(self) -> dict:
        """Strict JSON (an infinite rate as "inf"), without the API key: vLLM's --save-result --save-detailed
        fields under vLLM's names (its per-request lists hold 0.0, [] and "" for a failed request, as vLLM's), then
        ours: `options` and `requests`, one record per request."""
        o, ok = self.options, [r.success for r in self.results]
        options = {k: "inf" if v == math.inf else v for k, v in dataclasses.asdict(o).items() if k != "api_key"}
        records = [{**dataclasses.asdict(r), "tpot": r.tpot} for r in self.results]
        detailed = {"input_lens": [r.prompt_tokens for r in self.results],
                    "output_lens": [r.output_tokens if good else 0 for r, good in zip(self.results, ok)],
                    "ttfts": [r.ttft or 0.0 for r in self.results], "itls": [list(r.itl) for r in self.results],
                    "latencies": [r.e2el or 0.0 for r in self.results],
                    "start_times": [r.send_time for r in self.results], "errors": [r.error or "" for r in self.results]}
        return {"date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai",
                "backend": "openai", "label": None, "model_id": self.model, "tokenizer_id": o.tokenizer,
                "num_prompts": o.num_prompts, "request_rate": options["request_rate"], "burstiness": o.burstiness,
                "max_concurrency": o.max_concurrency, **self.metrics.as_json(), **detailed, "options": options,
                "requests": records}


def serve(o: ServeOptions) -> Benchmark:
    """Run the benchmark, print vLLM's report, and write --save-result and --plot where asked."""
    schedule = arrival_times(o.num_prompts, o.request_rate, o.burstiness, np.random.default_rng([o.seed, 1]))
    tokenizer = load_tokenizer(o)
    requests = build_dataset(o, tokenizer)
    count_tokens = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else None
    print(f"{_url(o, o.endpoint)}: {o.num_prompts} {o.dataset_name} requests at {o.request_rate} requests/s, "
          f"burstiness {o.burstiness}, max concurrency {o.max_concurrency or 'unlimited'}")
    model, results, duration = asyncio.run(_benchmark(o, requests, schedule, count_tokens))
    metrics = compute_metrics(results, duration, o.goodput, o.percentile_metrics, o.metric_percentiles)
    bench = Benchmark(o, model, metrics, results)
    print(format_report(bench.metrics))
    for error, count in collections.Counter(r.error for r in results if r.error).most_common(3):
        print(f"{count} failed with: {error}")
    if o.save_result:
        Path(o.save_result).write_text(json.dumps(bench.as_json(), indent=1, allow_nan=False))
    if o.plot:
        write_plot(results, duration, o.plot)
    return bench


# --- CLI ------------------------------------------------------------------------------------


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)}
    fields["goodput"] = parse_goodput(args.goodput or [])
    fields["percentile_metrics"] = tuple(m.strip() for m in args.percentile_metrics.split(","))
    fields["metric_percentiles"] = parse_percentiles(args.metric_percentiles)
    fields["api_key"] = args.api_key or os.environ.get("OPENAI_API_KEY")
    return ServeOptions(**fields)


def _run(args: argparse.Namespace) -> None:
    serve(options_from_args(args))


def add_parser(kinds) -> None:
    """Register `serve` under `jaxinfer bench`."""
    d = {f.name: f.default for f in dataclasses.fields(ServeOptions)}
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible completions server, measured as vLLM's",
                         description="Stream completions from any OpenAI-compatible server (ours, vLLM, llama.cpp) "
                                     "on an arrival schedule and report TTFT, TPOT, ITL and E2EL percentiles, "
                                     "throughput and goodput, defined as in `vllm bench serve`.")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default=d["endpoint"])
    p.add_argument("--model", default=None, help="default: the first id from GET BASE_URL/v1/models")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer; default: $OPENAI_API_KEY")
    p.add_argument("--num-prompts", type=int, default=d["num_prompts"])
    p.add_argument("--request-rate", type=float, default=d["request_rate"], help="requests/s; default inf: all at once")
    p.add_argument("--burstiness", type=float, default=d["burstiness"],
                   help="shape of the gamma-distributed gaps: 1 Poisson, <1 burstier, >1 steadier")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight; default: no limit")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--dataset-name", choices=DATASETS, default=d["dataset_name"],
                   help="random: random prompts; prefix: prompts sharing --num-prefixes prefixes; jsonl: a file")
    p.add_argument("--dataset-path", default=None,
                   help="jsonl: one object per line, 'prompt' (text or token ids), optional 'output_len'/'max_tokens'")
    p.add_argument("--random-input-len", type=int, default=d["random_input_len"],
                   help="prompt tokens (prefix: of the suffix after the shared prefix)")
    p.add_argument("--random-output-len", type=int, default=d["random_output_len"],
                   help="max_tokens (jsonl: where a line gives none)")
    p.add_argument("--random-range-ratio", type=float, default=d["random_range_ratio"],
                   help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--random-prefix-len", type=int, default=d["random_prefix_len"],
                   help="random: tokens of one random prefix shared by every prompt, on top of --random-input-len")
    p.add_argument("--prefix-len", type=int, default=d["prefix_len"], help="prefix: shared prefix tokens")
    p.add_argument("--num-prefixes", type=int, default=d["num_prefixes"], help="prefix: distinct prefixes")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a Hugging Face checkpoint directory: send text prompts of exact token lengths; "
                        "default: send token-id prompts")
    p.add_argument("--min-token-id", type=int, default=d["min_token_id"],
                   help="random prompt ids start here (clear of most special tokens)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"random prompt ids end below this; default {DEFAULT_VOCAB_SIZE}, or the tokenizer's")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request generates its max_tokens; on by default for every dataset "
                        "(vLLM turns it on for random only)")
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help="sent with every request; default 0, greedy (vLLM sends none by default: the server's)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms, KEY one of ttft, tpot, e2el; goodput = requests/s meeting all of them")
    p.add_argument("--percentile-metrics", default=",".join(DEFAULT_PERCENTILE_METRICS), metavar="M,M",
                   help="metrics to report, of ttft,tpot,itl,e2el; default all (vLLM's: ttft,tpot,itl)")
    p.add_argument("--metric-percentiles", default=",".join(f"{p:g}" for p in DEFAULT_METRIC_PERCENTILES),
                   metavar="P,P", help="percentiles to report, e.g. 50,90,99; default 90,99 (vLLM's: 99)")
    p.add_argument("--save-result", default=None, metavar="PATH", help="write metrics and per-request records as JSON")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of TTFT and E2EL percentiles over time (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(run=_run)
