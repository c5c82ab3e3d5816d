"""Structured output: a request's output held to a JSON schema, any JSON object, a regex, a grammar or a list of
choices (vLLM's `StructuredOutputsParams`).

Host code only; no JAX. The grammar engine is llguidance (vLLM's `guidance` backend): per sequence, a matcher
follows the tokens sampled so far and gives the bitmask of the tokens allowed next, which travels to the device
with the step and masks the logits before sampling. A mask needs the sequence's last token, so a sequence under
a grammar decodes one token per dispatch and the engine reads each step before planning the next (see
`Scheduler.awaits_tokens`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import json
import re
import threading

import numpy as np

from jaxinfer.tokenizer import Tokenizer

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece's byte-fallback pieces
GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept, the most recently used: requests often share one schema


def mask_words(vocab_size: int) -> int:
    """int32 words of a token bitmask over the vocabulary."""
    return (vocab_size + 31) // 32


@functools.cache
def _llguidance():
    """llguidance, imported at the first structured request: a machine without it (a GPU machine run from the
    source tree) serves everything else."""
    try:
        importlib.import_module("llguidance.numpy")
        return importlib.import_module("llguidance")
    except ImportError as e:
        raise ValueError(f"structured outputs need the llguidance package (pip install llguidance): {e}") from None


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its text), `regex`, `choice` (the output is one of these
    strings), `grammar` (Lark, as llguidance reads it, or llama.cpp's GBNF), `json_object=True` (any JSON object).
    For JSON, vLLM's `disable_any_whitespace` (no whitespace between its tokens; by default any is allowed) and
    `disable_additional_properties` (an object takes only the properties it names, unless its schema says
    otherwise; by default, as JSON Schema has it, any other too)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self):
        if self.choice is not None and not isinstance(self.choice, str):
            try:
                object.__setattr__(self, "choice", tuple(self.choice))
            except TypeError:
                pass
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, grammar or json_object, "
                             f"got {', '.join(given) or 'none'}")
        checks = {"json": isinstance(self.json, (str, dict)), "regex": isinstance(self.regex, str),
                  "grammar": isinstance(self.grammar, str), "json_object": self.json_object is True,
                  "choice": isinstance(self.choice, tuple) and bool(self.choice)
                  and all(isinstance(c, str) and c for c in self.choice)}
        wants = {"json": "a JSON schema (an object or its text)", "regex": "a string", "grammar": "a string",
                 "json_object": "true", "choice": "a non-empty list of non-empty strings"}
        kind = given[0]
        if not checks[kind]:
            raise ValueError(f"structured outputs: {kind} must be {wants[kind]}, got {getattr(self, kind)!r:.80}")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    def grammar_text(self) -> str:
        """As llguidance's grammar; ValueError if the schema, regex or grammar cannot be read."""
        kind = self.kind
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured outputs: json is not a JSON schema: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured outputs: a JSON schema is an object, got {schema!r:.80}")
            if self.disable_additional_properties:
                schema = closed_objects(schema)
            return _llguidance().LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": not self.disable_any_whitespace})
        if kind == "regex":
            return _llguidance().LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            return _llguidance().LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice))
        try:
            return _llguidance().grammar_from("grammar", self.grammar)  # Lark, or GBNF converted to Lark
        except ValueError as e:
            raise ValueError(f"structured outputs: {e}") from None


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties")  # keywords whose value is one schema
_SUBSCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems")  # a list of them
_NAMED_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> one


def closed_objects(schema):
    """A copy of a JSON schema in which every object schema that does not say otherwise takes only the properties
    it names (additionalProperties false): vLLM's `disable_additional_properties`."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _NAMED_SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Grammar:
    """One sequence's matcher: the tokens allowed next, as a bitmask row, and the tokens sampled so far. With
    `thinking_until`, a reasoning model's thinking comes first, unheld, up to those tokens in a row (`</think>`;
    gpt-oss's `<|channel|>final<|message|>`: vLLM's way with a reasoning parser): the grammar holds from the token
    after them."""

    def __init__(self, matcher, eos_id: int, mask_words: int, thinking_until: tuple[int, ...] | None = None):
        self._matcher, self._eos_id, self.mask_words = matcher, eos_id, mask_words
        self._thinking_until, self._thought = thinking_until, ()

    @property
    def active(self) -> bool:
        """The grammar holds the next token (the thinking, if any, is over)."""
        return self._thinking_until is None

    def fill_mask(self, row: np.ndarray) -> None:
        """row: int32 [ceil(V / 32)], bit v of word v // 32 set where token v may come next. A matcher left with
        nothing to allow (an error) allows the EOS, so that the row still has a token to sample."""
        _llguidance().numpy.fill_next_token_bitmask(self._matcher, row[None])
        if not row.any():
            row.view(np.uint32)[self._eos_id // 32] |= np.uint32(1 << self._eos_id % 32)

    def accept(self, token: int) -> bool:
        """Follow a sampled token; False if the grammar does not allow it."""
        if not self.active:
            self._thought = (*self._thought, token)[-len(self._thinking_until):]
            if self._thought == self._thinking_until:
                self._thinking_until = None
            return True
        return self._matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """Nothing but EOS may follow."""
        return self.active and self._matcher.is_stopped()


class GrammarCompiler:
    """Turns a request's `StructuredOutputsParams` into a matcher per sequence, against the engine's tokenizer."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_ids):
        self._source, self.vocab_size, self._eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._tokenizer = None  # llguidance's, made at the first structured request
        # (start, end) token ids of a reasoning model's thinking, each a run of tokens, set by a server with a
        # reasoning parser: the grammar then holds only after the thinking, unless the prompt has closed it (a
        # template without it).
        self.thinking_tokens: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._compiled: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()  # callers compile in their own threads
        # A server's defaults for every request (vLLM's --structured-outputs-config): True turns a JSON option on
        # for requests that leave it off.
        self.defaults = {"disable_any_whitespace": False, "disable_additional_properties": False}

    def compile(self, params: StructuredOutputsParams) -> str:
        """The grammar, checked against the vocabulary; ValueError says what is wrong with it. The server checks a
        request before it queues it, and many requests share a schema: the last few hundred are kept."""
        if self._source is None:
            raise ValueError("structured outputs need a tokenizer; this checkpoint has none")
        if not self._eos_ids:
            raise ValueError("structured outputs need an EOS token to end the output; this checkpoint has none")
        params = dataclasses.replace(params, **{k: True for k, on in self.defaults.items() if on})
        key = _cache_key(params)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        grammar = params.grammar_text()
        error = _llguidance().LLMatcher.validate_grammar(grammar, self._llguidance_tokenizer())
        if error:
            raise ValueError(f"structured outputs: the {params.kind} cannot be used: {error[:300]}")
        with self._lock:
            self._compiled[key] = grammar
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return grammar

    def matcher(self, grammar: str, eos_id: int | None, prompt_ids=()) -> Grammar:
        matcher = _llguidance().LLMatcher(self._llguidance_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs: {matcher.get_error()[:300]}")
        return Grammar(matcher, eos_id if eos_id is not None else self._eos_ids[0], mask_words(self.vocab_size),
                       self._thinking_until(prompt_ids))

    def _thinking_until(self, prompt_ids) -> tuple[int, ...] | None:
        """The tokens that will end the answer's thinking; None when the prompt's last thinking marker closes it."""
        if self.thinking_tokens is None:
            return None
        start, end = self.thinking_tokens
        ids, finals = list(prompt_ids), {start[-1], end[-1]}
        last = next((marker for at in range(len(ids), 0, -1) if ids[at - 1] in finals for marker in (end, start)
                     if tuple(ids[max(at - len(marker), 0):at]) == marker), None)
        return None if last == end else end

    def _llguidance_tokenizer(self):
        if self._tokenizer is None:
            tok, guidance = self._source, _llguidance()
            source = tok.tokenizer_json() or guidance.TokenizerWrapper(_Pieces(tok, self._eos_ids[0]))
            self._tokenizer = guidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=self._eos_ids)
        return self._tokenizer


def _cache_key(params: StructuredOutputsParams) -> str:
    """The params as canonical text (a schema's keys sorted): equal params, equal keys."""
    try:
        return json.dumps(dataclasses.asdict(params), sort_keys=True)
    except (TypeError, ValueError):  # a schema holding what JSON cannot (grammar_text refuses it anyway)
        return repr(params)


class _Pieces:
    """A sentencepiece tokenizer as llguidance's `TokenizerWrapper` reads one: every id's bytes, and a tokenizer
    of pieces of output. That one is sentencepiece's where its ids' bytes join up to the piece, else (blanks it
    would drop, bytes that are no text alone) the longest token bytes at each step."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.eos_token_id, self.bos_token_id = eos_id, tokenizer.bos_id
        self.tokens = tokenizer.token_bytes()
        # A byte-fallback piece (<0x6F>) whose byte is also a piece of its own ('o') is set apart as special, as
        # llguidance does reading a tokenizer.json: else it keeps the first id of equal bytes, the fallback one.
        fallback = [bool(_BYTE_PIECE.fullmatch(tokenizer.id_to_token(i) or "")) for i in range(len(self.tokens))]
        pieces = {piece for piece, byte in zip(self.tokens, fallback) if not byte}
        special = set(tokenizer.special_ids)
        special |= {i for i, piece in enumerate(self.tokens) if fallback[i] and piece in pieces}
        self.special_token_ids = sorted(special)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.tokens):
            if piece and i not in special:
                self._ids.setdefault(piece, i)
        self._longest = max(map(len, self._ids), default=1)
        self._encode = tokenizer.encode_inside

    def __call__(self, text) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        try:
            ids = self._encode(data.decode())
        except UnicodeDecodeError:
            ids = []
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        ids, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                found = self._ids.get(data[at:at + size])
                if found is not None:
                    ids.append(found)
                    at += size
                    break
            else:
                raise ValueError(f"no token holds byte {data[at]:#04x}")
        return ids


__all__ = ["StructuredOutputsParams", "Grammar", "GrammarCompiler"]
