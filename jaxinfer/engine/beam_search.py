"""Beam search as vLLM runs it (`LLM.beam_search`, the server's `use_beam_search`): over the engine, a token a round.

Host code only; no JAX. Each round every live beam of a prompt is one engine request for one token with
`logprobs = 2 * beam_width` (its prompt and the beam before it are cached pages, so a round computes about a
token a beam). A beam's candidates are those logprobs' tokens (the top 2 x beam_width and the one drawn); each
extends the beam by its token and its logprob. A candidate ending in EOS is complete (unless `ignore_eos`); the
best `beam_width` of the others by score live on. When `max_tokens` rounds are done (or the context is full),
the complete and the live beams are ranked together and the best `beam_width` are the answer. The score is
cumulative logprob / len(tokens) ** length_penalty, where the tokens include the prompt and not a final EOS,
exactly as vLLM scores them (transformers counts the generated tokens only).
"""

from __future__ import annotations

import asyncio
import dataclasses

from jaxinfer.engine.request import (MAX_LOGPROBS, CompletionOutput, Logprob, RequestOutput, SamplingParams, _check,
                                     _is_int, _is_number)


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's: the beams kept, the rounds run, and how beams are scored."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # of each round's request: only the drawn token, one candidate among 2 x width
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # the server's answers: keep a final EOS in the text

    def __post_init__(self):
        widest = MAX_LOGPROBS // 2
        _check(_is_int(self.beam_width) and 1 <= self.beam_width <= widest,
               f"beam_width must be an integer in [1, {widest}] (each round asks for 2 x beam_width logprobs, at "
               f"most {MAX_LOGPROBS}), got {self.beam_width!r}")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_number(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False")
        self.round_params()  # the temperature's checks

    def round_params(self) -> SamplingParams:
        """What each beam's request of a round asks: one token and its candidates' logprobs, no text."""
        return SamplingParams(max_tokens=1, logprobs=2 * self.beam_width, temperature=self.temperature,
                              ignore_eos=True, detokenize=False)


@dataclasses.dataclass
class BeamSearchSequence:
    """vLLM's: one beam. `tokens` begin with the prompt's; `logprobs` holds each round's candidates."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended in EOS) or "length", once it is an answer


@dataclasses.dataclass
class BeamSearchOutput:
    """vLLM's: a prompt's best beams, best first."""

    sequences: list[BeamSearchSequence]


class BeamSearch:
    """One prompt's search (vLLM's BeamSearchInstance): feed it each round's outputs with `advance`."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, eos_ids, rounds: int):
        self.params, self.eos_ids = params, frozenset(eos_ids)
        self.prompt_ids, self.rounds_left = list(prompt_ids), rounds
        self.beams = [BeamSearchSequence(list(prompt_ids), [])]
        self.completed: list[BeamSearchSequence] = []

    @property
    def live(self) -> list[BeamSearchSequence]:
        """The beams the next round extends (none once its rounds are done)."""
        return self.beams if self.rounds_left > 0 else []

    def advance(self, outputs: list[CompletionOutput]) -> None:
        """One round: `outputs[i]` is live beam i's one-token request's output."""
        candidates = []
        for beam, output in zip(self.beams, outputs, strict=True):
            if not output.logprobs:  # aborted: the beam ends here, as in vLLM
                continue
            entry = output.logprobs[0]
            for token, found in entry.items():
                grown = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry],
                                           beam.cum_logprob + found.logprob)
                if token in self.eos_ids and not self.params.ignore_eos:
                    grown.finish_reason = "stop"
                    self.completed.append(grown)
                else:
                    candidates.append(grown)
        self.beams = sorted(candidates, key=self.score, reverse=True)[:self.params.beam_width]
        self.rounds_left -= 1

    def score(self, beam: BeamSearchSequence) -> float:
        length = len(beam.tokens) - (beam.tokens[-1] in self.eos_ids)
        return beam.cum_logprob / length ** self.params.length_penalty

    def best(self) -> list[BeamSearchSequence]:
        """The answer: the best `beam_width` of the complete and the live beams (those cut "length")."""
        for beam in self.beams:
            beam.finish_reason = "length"
        return sorted(self.completed + self.beams, key=self.score, reverse=True)[:self.params.beam_width]

    def request_output(self, request_id: str, prompt: str | None, decode) -> RequestOutput:
        """The answer as a finished request of n = beam_width samples, as vLLM's server gives it: each sample's
        tokens are the generated ones, its text theirs, without a final EOS unless `include_stop_str_in_output`."""
        outputs = []
        for index, beam in enumerate(self.best()):
            generated = beam.tokens[len(self.prompt_ids):]
            shown = generated[:-1] if beam.finish_reason == "stop" and not self.params.include_stop_str_in_output \
                else generated
            outputs.append(CompletionOutput(index, decode(shown) if decode else "", generated, beam.finish_reason,
                                            logprobs=beam.logprobs, cumulative_logprob=beam.cum_logprob))
        return RequestOutput(request_id, prompt, list(self.prompt_ids), outputs, finished=True)


def round_prompt(beam: BeamSearchSequence, cache_salt: str | None):
    """A beam's request of a round: its tokens, under the prompt's cache salt if it had one."""
    return beam.tokens if cache_salt is None else {"prompt_token_ids": beam.tokens, "cache_salt": cache_salt}


async def search_stream(engine, request_id: str, prompt_ids: list[int], prompt: str | None,
                        params: BeamSearchParams, rounds: int, decode=None, cache_salt: str | None = None,
                        priority: int = 0):
    """The server's beam search of one prompt as a stream: runs the rounds on a running engine (each beam's
    request `{request_id}-{round}-{beam}`) and yields one finished RequestOutput. Cancelled, it drops the
    round's streams, which aborts their requests."""
    search = BeamSearch(prompt_ids, params, engine.eos_ids, rounds)
    for round_ in range(rounds):
        if not search.live:
            break
        streams = [engine.add_request(round_prompt(beam, cache_salt), params.round_params(),
                                      request_id=f"{request_id}-{round_}-{i}", priority=priority)
                   for i, beam in enumerate(search.live)]
        finals = await asyncio.gather(*(_final(stream) for stream in streams))
        search.advance([final.outputs[0] for final in finals])
    yield search.request_output(request_id, prompt, decode)


async def _final(stream):
    last = None
    async for last in stream:
        pass
    return last

