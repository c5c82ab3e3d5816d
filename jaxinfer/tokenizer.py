"""Text <-> token ids for a Hugging Face checkpoint directory.

Owns: loading the checkpoint's tokenizer (``tokenizer.json`` through the ``tokenizers`` library, else
``tokenizer.model`` through ``sentencepiece``), the special ids (BOS, every EOS, PAD) from the checkpoint's configs,
chat-template rendering, and streaming detokenization. Host code only: it must never import JAX, and it knows
nothing about models, weights or scheduling.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# The named special tokens that transformers passes to every chat template.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens of prompt context the detokenizer re-decodes (vLLM uses 5): enough to cover a multi-token character.
_CONTEXT_TOKENS = 5
_CONTINUATION_BYTE = re.compile(r"<0x[89AB][0-9A-F]>")  # a byte-fallback token of a UTF-8 continuation byte
# transformers' marker after the text of a message to continue: the rendered text is cut where it lands.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# What rendering a chat template raises when the template or its input is at fault, a request's template that
# recurses forever or divides by its message count among them: callers report "could not render", not a crash.
CHAT_TEMPLATE_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError, jinja2.TemplateError)


def openai_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as vLLM hands them to a template: an assistant's tool-call `arguments`, a JSON string
    in the API, become the dict tool-use templates expect (`arguments | tojson`), empty ones {}; an empty
    `tool_calls` list is dropped. Copies; a ValueError names arguments that are not JSON."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and isinstance(calls, list):
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            if calls:
                message["tool_calls"] = [_parsed_arguments(call) for call in calls]
        out.append(message)
    return out


def _parsed_arguments(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if isinstance(arguments, (dict, list)):
        return call
    try:
        parsed = json.loads(arguments) if arguments else {}
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"tool call {function.get('name')!r}: arguments must be a JSON object, got "
                         f"{arguments!r:.80} ({e})") from None
    return {**call, "function": {**function, "arguments": parsed}}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    """A token in tokenizer_config.json is a string or an AddedToken-like dict."""
    return token.get("content") if isinstance(token, dict) else token


def _ids(value) -> list[int]:
    """A config's ``*_token_id`` is absent, null, an int or a list of ints."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class _TokenizersBackend:
    """tokenizer.json run exactly as the file describes it: normalizer, pre-tokenizer, model, post-processor (which
    adds BOS/EOS, as in transformers 5, which drops tokenizer_config's add_bos_token when a tokenizer.json exists) and
    decoder."""

    def __init__(self, path: Path):
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        # An engine must see the whole prompt: the file's truncation and padding are for training pipelines.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.default_tokens: dict[str, str] = {}
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: 2 s for 4 MB of text, which froze
        # the server's event loop even with the work in another thread); the ids are the same.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_json(self) -> str:
        return self._tok.to_str()


class _SentencePieceBackend:
    """tokenizer.model run by sentencepiece itself, with what transformers layers on top: the added tokens of
    tokenizer_config.json are matched on the raw text first, and BOS/EOS follow ``add_bos_token``/``add_eos_token``.

    Text after an added token gets sentencepiece's dummy-prefix space only with ``legacy: true``, as in transformers.
    Text that starts with whitespace still gets the dummy prefix, as sentencepiece (and llama.cpp) do; transformers 5
    drops it there.
    """

    def __init__(self, path: Path, config: dict):
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except Exception as e:  # protobuf raises its own DecodeError; tiktoken files also end in .model
            raise ValueError(f"{path} is not a sentencepiece model (tiktoken files are not supported): {e}") from e
        self._dummy_prefix = config.get("add_prefix_space", proto.normalizer_spec.add_dummy_prefix)
        self._legacy = config.get("legacy", False)
        self._prefixed, self._bare = (self._processor(proto, prefix) for prefix in (True, False))
        sp = self._bare
        added_tokens = config.get("added_tokens_decoder") or {}
        self._added = {int(i): _content(t) for i, t in added_tokens.items()}
        specials = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        self._added.update({i: sp.id_to_piece(i) for i in specials if i not in self._added})
        specials |= {int(i) for i, t in added_tokens.items() if t.get("special")}
        self.special_ids = frozenset(specials)
        self._token_ids = {content: i for i, content in self._added.items()}
        by_length = sorted(self._token_ids, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self.vocab_size = max(sp.get_piece_size(), max(self._added, default=-1) + 1)
        self.default_tokens = {
            name: sp.id_to_piece(i)
            for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                            ("pad_token", sp.pad_id()))
            if i >= 0
        }
        self._template = self._bos_eos(config)

    @staticmethod
    def _processor(proto, dummy_prefix: bool) -> sentencepiece.SentencePieceProcessor:
        proto.normalizer_spec.add_dummy_prefix = dummy_prefix
        return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _bos_eos(self, config: dict) -> tuple[list[int], list[int]]:
        def ids(flag: str, name: str) -> list[int]:
            token = _content(config.get(name)) or self.default_tokens.get(name)
            token_id = self.token_to_id(token) if config.get(flag) and token else None
            return [] if token_id is None else [token_id]

        return ids("add_bos_token", "bos_token"), ids("add_eos_token", "eos_token")

    def encode(self, text: str, add_special_tokens: bool, at_start: bool = True) -> list[int]:
        ids, start = [], 0
        for match in self._split.finditer(text) if self._split else ():
            ids += self._encode_plain(text[start:match.start()], at_start=at_start and start == 0)
            ids.append(self._token_ids[match.group()])
            start = match.end()
        ids += self._encode_plain(text[start:], at_start=at_start and start == 0)
        bos, eos = self._template if add_special_tokens else ([], [])
        return bos + ids + eos

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        prefixed = self._dummy_prefix and (at_start or self._legacy)
        return (self._prefixed if prefixed else self._bare).encode(text) if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        parts = []
        for n, (added, run) in enumerate(itertools.groupby(ids, key=self._added.__contains__)):
            if added:
                parts += [self._added[i] for i in run]
            else:
                # Only text at the very start loses the dummy-prefix space, as in sentencepiece and transformers.
                first = n == 0 and self._dummy_prefix
                parts.append((self._prefixed if first else self._bare).decode(list(run)))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._token_ids:
            return self._token_ids[token]
        token_id = self._bare.piece_to_id(token)
        # piece_to_id answers the unknown id for a piece it lacks.
        return token_id if self._bare.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id]
        return self._bare.id_to_piece(token_id) if 0 <= token_id < self._bare.get_piece_size() else None

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes in a text: a byte piece's byte, '▁' as a space; an added or control token's content."""
        sp, out = self._bare, []
        for i in range(self.vocab_size):
            piece = self.id_to_token(i) or ""
            if i in self._added:
                out.append(piece.encode())
            elif sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out


def _load_backend(path: Path, config: dict) -> _TokenizersBackend | _SentencePieceBackend:
    if (path / "tokenizer.json").is_file():
        return _TokenizersBackend(path / "tokenizer.json")
    if (path / "tokenizer.model").is_file():
        return _SentencePieceBackend(path / "tokenizer.model", config)
    where = path if path.is_dir() else f"{path} (not a directory)"
    raise FileNotFoundError(
        f"no tokenizer in {where}: looked for tokenizer.json (Hugging Face tokenizers) and "
        "tokenizer.model (sentencepiece)"
    )


def _load_chat_templates(path: Path, config: dict) -> dict[str, str]:
    """Chat templates by name, found where transformers 5 looks: the files it saves (chat_template.jinja is
    "default", additional_chat_templates/NAME.jinja) win over tokenizer_config.json's ``chat_template``, a string
    ("default") or a list of {name, template}. Failing those, a multimodal checkpoint's processor template
    (chat_template.json), which vLLM falls back to."""
    files = {p.stem: p for p in sorted((path / "additional_chat_templates").glob("*.jinja"))}
    if (path / "chat_template.jinja").is_file():
        files["default"] = path / "chat_template.jinja"
    if files:
        return {name: file.read_text(encoding="utf-8") for name, file in files.items()}
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    processor = path / "chat_template.json"  # a multimodal checkpoint's processor's template, vLLM's last resort
    if not template and processor.is_file():
        template = json.loads(processor.read_text(encoding="utf-8")).get("chat_template")
    return {"default": template} if template else {}


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps, as transformers gives them.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)  # the checkpoint's templates and the few that requests bring, compiled once
def load_chat_template(value: str) -> str:
    """vLLM's --chat-template: a file's path, or the template itself on one line (its escapes, such as \\n, read as
    Python reads them). A value that opens no file and holds none of Jinja's `{`, `}` or a line break is a path
    that failed, and is refused; so is a template that does not compile."""
    try:
        source = Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r} looks like a file path, but it could not be read: "
                             f"{e}") from None
        source = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    try:
        _compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template is not valid Jinja: {e}") from None
    return source


def _compile_chat_template(source: str) -> jinja2.Template:
    """The same sandboxed environment transformers renders chat templates in, so checkpoints' templates agree."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A checkpoint's tokenizer: ids, special ids and chat template, matching ``transformers.AutoTokenizer``."""

    def __init__(self, backend, special_tokens: dict[str, str], model_configs: list[dict],
                 chat_templates: dict[str, str], name: str):
        self._backend = backend
        self._special_tokens = special_tokens
        self._chat_templates = chat_templates
        self.name = name
        self.vocab_size: int = backend.vocab_size
        self.special_ids: frozenset[int] = backend.special_ids  # the ids decode(skip_special_tokens=True) drops
        self.bos_id = self._special_id("bos", model_configs)
        eos = [i for config in model_configs for i in _ids(config.get("eos_token_id"))]
        eos += _ids(self._token_id("eos_token"))
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.eos_id = self._token_id("eos_token")  # transformers' eos_token_id, the EOS vLLM reports as no stop id
        self.pad_id = self._special_id("pad", model_configs)
        self.add_bos: bool = self.bos_id is not None and self.encode("")[:1] == [self.bos_id]
        self._anchor: list[int] | None = None  # token_text's anchor token and its text, made at its first call
        self._anchor_text = ""
        self._token_texts: dict[int, str] = {}

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        """Load from a Hugging Face checkpoint directory; tokenizer.json is preferred over tokenizer.model."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        backend = _load_backend(path, config)
        special_tokens = dict(backend.default_tokens)
        special_tokens.update({name: _content(config[name]) for name in _NAMED_TOKENS if config.get(name)})
        # generation_config.json describes how this checkpoint generates, so it comes before config.json.
        model_configs = [_read_json(path / "generation_config.json"), _read_json(path / "config.json")]
        return cls(backend, special_tokens, model_configs, _load_chat_templates(path, config), str(path))

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _special_id(self, kind: str, model_configs: list[dict]) -> int | None:
        """The tokenizer's own ``<kind>_token`` first, else the first ``<kind>_token_id`` in the model configs."""
        token_id = self._token_id(f"{kind}_token")
        config_ids = [i for config in model_configs for i in _ids(config.get(f"{kind}_token_id"))]
        return token_id if token_id is not None else next(iter(config_ids), None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text as it reads inside a sequence (what logprobs report: a sequence's token texts
        concatenate to its text). Decoded after a fixed anchor token whose text is then removed: decoding one
        token alone would drop the leading space that sentencepiece strips at the start of a text."""
        if self._anchor is None:
            self._anchor = self.encode("a", add_special_tokens=False)[-1:]
            self._anchor_text = self.decode(self._anchor, skip_special_tokens=False)
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.decode(self._anchor + [token_id], skip_special_tokens=False)[len(self._anchor_text):]
            self._token_texts[token_id] = text
        return text

    def tokenizer_json(self) -> str | None:
        """The tokenizer.json this tokenizer runs, as text; None for a sentencepiece tokenizer (see `token_bytes`)."""
        return self._backend.to_json() if isinstance(self._backend, _TokenizersBackend) else None

    def token_bytes(self) -> list[bytes]:
        """A sentencepiece tokenizer's bytes of every id (what a grammar engine matches text against)."""
        return self._backend.token_bytes()

    def encode_inside(self, text: str) -> list[int]:
        """A sentencepiece tokenizer's ids of `text` in the middle of a text: no word-start space before it (what
        a grammar engine tokenizes a forced piece of output with), no special tokens."""
        return self._backend.encode(text, False, at_start=False)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for one id (e.g. 'Ġthe', '▁the', '<0xE6>'), None outside the vocabulary."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template: str | None = None, **kwargs) -> str:
        """Render a chat template to text, as transformers' ``apply_chat_template(tokenize=False)``.

        The template is ``chat_template`` (the name of one of the checkpoint's templates, or a template's source),
        else the checkpoint's: its "tool_use" template, where there is one, for requests that pass ``tools``, else
        its default. ``continue_final_message`` leaves the final message open: the text ends right after its content
        (what the template adds after it is cut), for the model to continue; it cannot go with
        ``add_generation_prompt``. Other keyword arguments (``tools`` among them) are the template's variables.

        The rendered text usually carries its own BOS: encode it with ``add_special_tokens=False``, as transformers
        does.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: continue the "
                             "final message, or start a new assistant message after it")
        source = self._template_source(chat_template, kwargs.get("tools"))
        # Like transformers: drop None fields, which many templates would render as the text "None".
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        final = _mark_final_message(messages, source) if continue_final_message else None
        context = {"tools": None, "documents": None, **self._special_tokens, **kwargs}
        text = _compile_chat_template(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )
        return text if final is None else _cut_after_final_message(text, final)

    def _template_source(self, chat_template: str | None, tools) -> str:
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        # As in transformers: a "tool_use" template, where there is one, renders requests that pass tools.
        name = "tool_use" if tools is not None and "tool_use" in self._chat_templates else "default"
        if name not in self._chat_templates:
            raise ValueError(
                f"the checkpoint {self.name} has no chat template (looked for chat_template.jinja, "
                f"tokenizer_config.json 'chat_template' and chat_template.json; named templates: "
                f"{sorted(self._chat_templates)}); "
                "send a plain prompt instead"
            )
        return self._chat_templates[name]


def _mark_final_message(messages: list[dict], source: str) -> str:
    """Append transformers' tag to the final message's content (a string, or its last part with text), in place;
    returns the content's text before it."""
    content = messages[-1].get("content") if messages else None
    if content is None:
        raise ValueError("continue_final_message is set but there is no final message with content to continue")
    if "content" not in source:
        raise ValueError("continue_final_message is set but the chat template never reads a message's 'content'")
    if isinstance(content, (list, tuple)):
        texts = [i for i, part in enumerate(content) if isinstance(part, dict) and "text" in part]
        if not texts:
            raise ValueError("continue_final_message is set but the final message has no text part to continue")
        final, content = content[texts[-1]]["text"], list(content)
        content[texts[-1]] = {**content[texts[-1]], "text": final + _CONTINUE_TAG}
    else:
        final, content = content, content + _CONTINUE_TAG
    messages[-1] = {**messages[-1], "content": content}
    return final


def _cut_after_final_message(text: str, final: str) -> str:
    """The rendered text up to the tag after the final message, as transformers cuts it: where the template
    trimmed the tag's trailing space, it trimmed the message too, so trailing whitespace goes."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the rendered chat: "
                         "the chat template changes or drops it, so there is no place to continue it "
                         f"(final message: {final.strip()!r:.80})")
    end = text.rindex(tag)
    return text[:end] if text.startswith(_CONTINUE_TAG, end) else text[:end].rstrip()


class IncrementalDetokenizer:
    """Turns generated ids into text one token at a time, emitting only whole characters.

    As vLLM does with its prefix and read offsets, each step decodes a short window of ids twice: up to the read
    offset (text already emitted) and to the end; the new text is the difference, held back while it ends in U+FFFD
    (an unfinished UTF-8 sequence split across tokens). The window starts at the first token of the latest emission,
    so both decodes start at the same token, so start-of-text rules of decoders (sentencepiece dropping the first '▁',
    Strip decoders) apply to both and cancel. Ids that ``skip_special_tokens`` drops never enter the window.

    Without ``prompt_ids``, ``text`` equals ``tokenizer.decode(generated ids)`` (after ``flush()``). With them, the
    window starts in the prompt's last tokens (on a character boundary) and ``text`` continues the prompt's text: a
    sentencepiece model's first generated word keeps its leading space, as in vLLM. A prompt (given as ids) may end
    inside a character: the generated ids that finish it emit it whole, as ``decode(prompt + generated)`` has it.

    One exception: where a tokenizers ByteFallback decoder meets invalid UTF-8, it turns the whole run of byte tokens
    into U+FFFD, so characters streamed before the bad byte arrived stay in ``text`` but not in ``decode``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Dropped ids cost nothing when a model repeats them (an EOS under ignore_eos), and left out of the prompt's
        # last few ids they leave room for its text, whose end decides the first generated word's space.
        self._skipped = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._ids = self._prompt_context(prompt_ids)  # the window
        self._read_offset = len(self._ids)
        self.text = ""
        # The prompt's text while it ends in U+FFFD, perhaps an unfinished character: its ids are then read again,
        # and the first emission starts where the window's text stops agreeing with the prompt's.
        prompt_text = self._decode(self._ids)
        self._prompt_text = prompt_text if prompt_text.endswith("\ufffd") else None
        if self._prompt_text is not None:
            while self._read_offset and self._decode(self._ids[:self._read_offset]).endswith("\ufffd"):
                self._read_offset -= 1

    def _prompt_context(self, prompt_ids) -> list[int]:
        """The prompt's last few ids that decode reads, started on a character boundary: first a byte-fallback token
        of a UTF-8 continuation byte would spoil the whole byte run under the tokenizers ByteFallback decoder (a run
        with a bad byte decodes to U+FFFD throughout), generated characters included."""
        context: list[int] = []
        for token_id in map(int, reversed(prompt_ids)):
            if token_id in self._skipped:
                continue
            # Enough ids, unless the first is a continuation byte: then on to its character's start (3 at most).
            if len(context) >= _CONTEXT_TOKENS and (
                    len(context) == _CONTEXT_TOKENS + 3
                    or not _CONTINUATION_BYTE.fullmatch(self._tokenizer.id_to_token(context[-1]) or "")):
                break
            context.append(token_id)
        return context[::-1]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes ('' while a character is unfinished)."""
        token_id = int(token_id)
        if token_id in self._skipped:
            return ""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back at the end of generation; an unfinished character decodes to U+FFFD,
        as in ``decode``."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self._decode(self._ids)
        if window.endswith("\ufffd") and not final:
            return ""
        if self._prompt_text is None:
            start = len(self._decode(self._ids[:self._read_offset]))
        else:  # the prompt's text up to where the generated ids change it (finish its last character)
            start = len(os.path.commonprefix([self._prompt_text, window]))
        if len(window) <= start:
            return ""
        delta = window[start:]
        # The next window starts after the ids just emitted; nothing before it is decoded again.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._prompt_text = None
        self.text += delta
        return delta
