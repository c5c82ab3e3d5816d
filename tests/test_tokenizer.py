"""jaxinfer.tokenizer against transformers 5, on tokenizers built here (no hub downloads).

Checkpoints and the reference each is compared with (``AutoTokenizer.from_pretrained(dir)`` unless said):
- ``bpe``: a byte-level BPE tokenizer.json with a BOS post-processor; reference class TokenizersBackend
  (tokenizer_class "PreTrainedTokenizerFast"). Named chat templates (a list with "default").
- ``spm``: only a tokenizer.model (sentencepiece BPE with byte fallback, Llama's normalizer settings) and a
  tokenizer_config.json with tokenizer_class "LlamaTokenizer", ``add_bos_token: true`` and two added tokens beyond
  the sentencepiece vocabulary; reference class LlamaTokenizer, which converts the model to a tokenizers pipeline.
  BOS follows the checkpoint's ``add_bos_token`` (transformers 5 does too when the key is present).
- ``converted``: what transformers saves for ``spm`` (tokenizer.json with a Metaspace pre-tokenizer, the template
  in chat_template.jinja), with tokenizer.model copied beside it (tokenizer.json must win); reference class
  LlamaTokenizer.
- ``default``: jaxinfer/assets/default, the demo model's own sentencepiece BPE (tokenizer.model, byte fallback,
  ChatML tokens as user-defined pieces); reference class LlamaTokenizer.
"""

import io
import json
import random
import shutil
from pathlib import Path

import jinja2
import pytest
import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer, openai_messages

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "jaxinfer" / "assets" / "default"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces the model has seen.",
    "Serving engines stream text back to the user one token at a time, so every byte must arrive intact.",
    "def forward(params, batch, kv):\n    return logits, kv  # a pure function\n",
    "日本語のテキストです。東京は大きい都市です。中文文本测试，你好世界。한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧 ❤️ — and punctuation «quotes» “curly” ‘single’ …",
    "Accents: café naïve résumé Ünïcödé Straße façade ÅØÆ œuvre São Paulo Kraków.",
    "Numbers 1234567890, 3.14159, -42, 1e-5; tabs\tand  double  spaces,\n\nblank lines.",
] * 8

# Compared with transformers on every checkpoint. None starts with whitespace: see test_spm_leading_whitespace.
TEXTS = [
    "Hello, world! This is a test of the tokenizer.",
    "日本語のテキストです。中文文本测试，你好世界。",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 joined by ZWJ.",
    "Accents: café naïve résumé Ünïcödé Straße façade ÅØÆ",
    "whitespace   runs\t\ttabs\n\nnewlines\n   indented\r\nCRLF  trailing  ",
    "code:\ndef f(x):\n    return x ** 2  # square\n",
    "mixed日本😀é \n \n end",
    "",
]
# Special tokens inside the text are matched as tokens, as transformers does.
SPECIAL_TEXTS = {
    "bpe": "<|im_start|>user\nhi there<|im_end|>\n<think>ok</think><|endoftext|>",
    "spm": "<s>[INST] hi there [/INST]answer</s><|im_end|><think>x",
    "converted": "<s>[INST] hi there [/INST]answer</s>",
    "default": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|></s>",
}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 😀, what is 2+2?"},
    {"role": "assistant", "content": "4.", "tool_calls": None},  # None fields are dropped, as transformers does
    {"role": "user", "content": "And café × 3?"},
]

BPE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% if m['tool_calls'] is defined %}[calls]{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if think %}<think>\n{% endif %}{% endif %}"
)
TOOL_TEMPLATE = "<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n" + BPE_TEMPLATE
# Written over several indented lines, as hub templates are: trim_blocks and lstrip_blocks must match transformers.
LLAMA2_TEMPLATE = """
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' }}
        {%- if loop.first and system is defined %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}
        {{- message['content'] | trim + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] | trim + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""


def _added(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _make_bpe(root: Path) -> Path:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[AddedToken(t, special=True) for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    tok.save(str(root / "tokenizer.json"))
    templates = [{"name": "default", "template": BPE_TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE}]
    _write_json(root / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "chat_template": templates, "clean_up_tokenization_spaces": False})
    _write_json(root / "generation_config.json", {"eos_token_id": [1, 3]})
    _write_json(root / "config.json", {"model_type": "llama", "eos_token_id": 1, "bos_token_id": 0})
    return root


def _train_spm() -> bytes:
    model = io.BytesIO()
    # Llama's settings: BPE, byte fallback, no normalization, whitespace kept, digits split.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.99, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    return model.getvalue()


def _make_spm(root: Path, model: bytes) -> Path:
    (root / "tokenizer.model").write_bytes(model)
    size = sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    added = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>"),
             str(size): _added("<|im_end|>"), str(size + 1): _added("<think>", special=False)}
    _write_json(root / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "chat_template": LLAMA2_TEMPLATE})
    _write_json(root / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return root


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return _train_spm()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, spm_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    dirs = {name: root / name for name in ("bpe", "spm", "converted")}
    for d in dirs.values():
        d.mkdir()
    _make_bpe(dirs["bpe"])
    _make_spm(dirs["spm"], spm_model)
    AutoTokenizer.from_pretrained(dirs["spm"]).save_pretrained(dirs["converted"])
    # Real checkpoints often ship both files; transformers 5 saves only tokenizer.json.
    shutil.copy(dirs["spm"] / "tokenizer.model", dirs["converted"] / "tokenizer.model")
    return {**dirs, "default": DEFAULT_DIR}


@pytest.fixture(scope="module", params=["bpe", "spm", "converted", "default"])
def pair(request, checkpoints):
    """(name, ours, transformers' AutoTokenizer) for one checkpoint."""
    path = checkpoints[request.param]
    return request.param, Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_fixture_files(checkpoints):
    assert not (checkpoints["spm"] / "tokenizer.json").exists()
    converted = checkpoints["converted"]
    assert (converted / "tokenizer.json").exists() and (converted / "chat_template.jinja").exists()


def test_reference_classes(pair):
    name, _, hf = pair
    expected = {"bpe": "TokenizersBackend", "spm": "LlamaTokenizer", "converted": "LlamaTokenizer",
                "default": "LlamaTokenizer"}
    assert type(hf).__name__ == expected[name]


def test_encode_matches_transformers(pair):
    name, ours, hf = pair
    for text in TEXTS + [SPECIAL_TEXTS[name]]:
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special) == hf.encode(
                text, add_special_tokens=add_special), (name, text, add_special)


def test_decode_matches_transformers(pair):
    name, ours, hf = pair
    for text in TEXTS + [SPECIAL_TEXTS[name]]:
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        if text in TEXTS:
            assert ours.decode(ids) == text


def test_special_ids(pair):
    name, ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_id == hf.bos_token_id
    assert ours.pad_id == hf.pad_token_id
    assert ours.add_bos and hf.encode("x")[0] == hf.bos_token_id
    expected_eos = {"bpe": {1, 3}, "spm": {2}, "converted": {2}, "default": {2, 4}}[name]
    assert hf.eos_token_id in ours.eos_ids and set(ours.eos_ids) == expected_eos
    assert ours.token_to_id(hf.eos_token) == hf.eos_token_id
    assert ours.id_to_token(hf.bos_token_id) == hf.bos_token
    some_ids = hf.encode(TEXTS[1], add_special_tokens=False)
    assert [ours.id_to_token(i) for i in some_ids] == hf.convert_ids_to_tokens(some_ids)


def _stream(tokenizer, ids, prompt_ids=(), skip_special_tokens=True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == detok.text
    return deltas, detok.text


def test_streaming_equals_full_decode(pair):
    name, ours, hf = pair
    for text in TEXTS + [SPECIAL_TEXTS[name], " leading space", "\n\nnewline first"]:
        ids = hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            deltas, streamed = _stream(ours, ids, skip_special_tokens=skip)
            assert streamed == hf.decode(ids, skip_special_tokens=skip), (name, text, skip)
            assert not any("\ufffd" in d for d in deltas), (name, text, deltas)


def _random_ids(rng: random.Random, pool: list[int]) -> list[int]:
    return [rng.choice(pool) for _ in range(rng.randrange(1, 40))]


def test_streaming_random_ids(pair):
    """Random ids (invalid UTF-8 included) stream to exactly the full decode. Not for byte-fallback tokens under the
    tokenizers ByteFallback decoder, which turns a whole byte run into U+FFFD once any byte of it is invalid: text
    already streamed cannot be taken back (see IncrementalDetokenizer)."""
    name, ours, _ = pair
    pool = list(range(ours.vocab_size))
    if name == "converted":
        pool = [i for i in pool if not ours.id_to_token(i).startswith("<0x")]
    rng = random.Random(0)
    for _ in range(30):
        ids = _random_ids(rng, pool)
        for skip in (True, False):
            assert _stream(ours, ids, skip_special_tokens=skip)[1] == ours.decode(ids, skip_special_tokens=skip)


def test_decode_random_ids(pair, spm_model):
    """On invalid UTF-8 the sentencepiece backend decodes as sentencepiece does (each bad byte becomes U+FFFD),
    where transformers 5's ByteFallback conversion replaces the whole byte run."""
    name, ours, hf = pair
    rng = random.Random(1)
    if name == "spm":
        sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
        pool = list(range(3, sp.get_piece_size()))  # sentencepiece renders <unk> as ' ⁇ ' where we skip it
        for _ in range(30):
            ids = _random_ids(rng, pool)
            assert ours.decode(ids) == sp.decode(ids)
        return
    for _ in range(30):
        ids = _random_ids(rng, list(range(ours.vocab_size)))
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_streaming_with_prompt_continues_prompt_text(pair):
    name, ours, hf = pair
    prompt = hf.encode("The answer is")
    for text in TEXTS:
        ids = hf.encode(" " + text, add_special_tokens=False)
        full = hf.decode(prompt + ids)
        prompt_text = hf.decode(prompt)
        assert full.startswith(prompt_text)
        assert _stream(ours, ids, prompt_ids=prompt)[1] == full[len(prompt_text):], (name, text)


def test_streaming_holds_back_partial_characters(pair):
    _, ours, _ = pair
    detok = IncrementalDetokenizer(ours)
    ids = ours.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # these small vocabularies spell the emoji in bytes
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "😀"


def test_chat_template_matches_transformers(pair):
    name, ours, hf = pair
    for add_generation_prompt in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == (
            hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False))


def test_chat_template_kwargs_and_tojson(checkpoints):
    ours = Tokenizer.from_pretrained(checkpoints["bpe"])
    hf = AutoTokenizer.from_pretrained(checkpoints["bpe"])
    tools = [{"type": "function", "function": {"name": "add", "description": "adds <numbers> & more"}}]
    kwargs = {"tools": tools, "think": True, "add_generation_prompt": True}
    rendered = ours.apply_chat_template(MESSAGES, **kwargs)
    assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
    assert rendered.startswith("<|im_start|>tools\n") and "<numbers> & more" in rendered  # tool_use, plain json
    assert rendered.endswith("<think>\n")


def test_chat_template_raise_exception(checkpoints):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    ours = Tokenizer.from_pretrained(checkpoints["spm"])
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(checkpoints["spm"]).apply_chat_template(bad, tokenize=False)


def _prefilled(name: str, text: str) -> list[dict]:
    """MESSAGES' first exchange ending in an assistant message to continue (the Llama 2 template has no system)."""
    return [*MESSAGES[int(name in ("spm", "converted")):2], {"role": "assistant", "content": text}]


def test_continue_final_message_matches_transformers(pair):
    """The final message is left open: the text stops right after its content, trailing whitespace kept, for the
    model to continue."""
    name, ours, hf = pair
    for text in ("The answer is", "Sure, ", " spaced  \n"):
        messages = _prefilled(name, text)
        rendered = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
        assert rendered == hf.apply_chat_template(messages, tokenize=False, continue_final_message=True), (name, text)
        assert rendered.endswith(text) and rendered != ours.apply_chat_template(messages, add_generation_prompt=False)


# Trims what it renders: transformers then cuts the final message's trailing whitespace too.
TRIMMED_TEMPLATE = BPE_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")


def test_chat_template_override_matches_transformers(checkpoints):
    """chat_template is a template's source or the name of one of the checkpoint's templates, as in transformers;
    the final message's text parts can be continued."""
    ours = Tokenizer.from_pretrained(checkpoints["bpe"])
    hf = AutoTokenizer.from_pretrained(checkpoints["bpe"])
    prefilled = _prefilled("bpe", "Sure, ")
    parts = [*prefilled[:-1], {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "Sure, "}]}]
    cases = [(MESSAGES, {"chat_template": TRIMMED_TEMPLATE, "think": True}),
             (MESSAGES, {"chat_template": "tool_use", "tools": []}),
             (prefilled, {"chat_template": TRIMMED_TEMPLATE, "continue_final_message": True}),
             (parts, {"continue_final_message": True})]
    for messages, kwargs in cases:
        kwargs = {"add_generation_prompt": not kwargs.get("continue_final_message"), **kwargs}
        rendered = ours.apply_chat_template(messages, **kwargs)
        assert rendered == hf.apply_chat_template(messages, tokenize=False, **kwargs), kwargs
    assert rendered.endswith("Sure, ")
    trimmed = ours.apply_chat_template(prefilled, add_generation_prompt=False, continue_final_message=True,
                                       chat_template=TRIMMED_TEMPLATE)
    assert trimmed.endswith("assistant\nSure,")
    assert "<|im_start|>tools\n[]" in ours.apply_chat_template(MESSAGES, chat_template="tool_use", tools=[])


SURE = _prefilled("bpe", "Sure")
CONTINUE = {"continue_final_message": True}
UPPER_TEMPLATE = BPE_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")  # "Sure" is not rendered
BAD_TEMPLATE_CALLS = {
    "both flags": (SURE, {**CONTINUE, "add_generation_prompt": True}, ValueError,
                   "continue_final_message and add_generation_prompt"),
    "content changed": (SURE, {**CONTINUE, "chat_template": UPPER_TEMPLATE}, ValueError,
                        "final message does not appear"),
    "content never read": (SURE, {**CONTINUE, "chat_template": "{{ messages[0].role }}"}, ValueError,
                           "continue_final_message is set"),
    "syntax error": (MESSAGES, {"chat_template": "{% for m in messages %}{{ m.content }"}, jinja2.TemplateSyntaxError,
                     "unexpected"),
}


@pytest.mark.parametrize("messages, kwargs, error, match", BAD_TEMPLATE_CALLS.values(), ids=BAD_TEMPLATE_CALLS.keys())
def test_bad_template_calls_fail_as_in_transformers(checkpoints, messages, kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoTokenizer.from_pretrained(checkpoints["bpe"]).apply_chat_template(messages, tokenize=False, **kwargs)
    with pytest.raises(error, match=match):
        Tokenizer.from_pretrained(checkpoints["bpe"]).apply_chat_template(
            messages, **{"add_generation_prompt": False, **kwargs})


def test_no_chat_template_is_clear(checkpoints, tmp_path):
    shutil.copy(checkpoints["bpe"] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=f"{tmp_path} has no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES)


def test_a_processors_chat_template_is_the_fallback(checkpoints, tmp_path):
    """A multimodal checkpoint (Gemma 3 4B and up) may keep its template only in the processor's
    chat_template.json: it renders what transformers renders with that template."""
    shutil.copy(checkpoints["bpe"] / "tokenizer.json", tmp_path / "tokenizer.json")
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    _write_json(tmp_path / "chat_template.json", {"chat_template": template})
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ours == reference.apply_chat_template(MESSAGES, chat_template=template, tokenize=False)
    assert ours.endswith("<assistant>")


def test_missing_tokenizer_is_clear(tmp_path):
    _write_json(tmp_path / "config.json", {"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer in {tmp_path}: looked for tokenizer\.json .*"
                                                r"tokenizer\.model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "absent")


def test_spm_leading_whitespace_follows_sentencepiece(checkpoints, spm_model):
    """Text that starts with whitespace keeps sentencepiece's dummy-prefix space, as sentencepiece, llama.cpp and
    transformers 4 do; transformers 5's Metaspace conversion drops it, so the reference here is sentencepiece."""
    ours = Tokenizer.from_pretrained(checkpoints["spm"])
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    for text in [" leading", "   three spaces", "\n newline", " "]:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text)
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


def test_spm_without_add_bos_token(checkpoints, tmp_path, spm_model):
    _make_spm(tmp_path, spm_model)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    _write_json(tmp_path / "tokenizer_config.json", config)
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert not ours.add_bos and ours.bos_id == 1
    assert ours.encode(TEXTS[0]) == hf.encode(TEXTS[0]) == hf.encode(TEXTS[0], add_special_tokens=False)


def test_spm_legacy_prefixes_text_after_special_tokens(tmp_path, spm_model):
    _make_spm(tmp_path, spm_model)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    _write_json(tmp_path / "tokenizer_config.json", {**config, "legacy": True})
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = SPECIAL_TEXTS["spm"]
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text) != Tokenizer.from_pretrained(_make_spm(tmp_path, spm_model)).encode(text)


def test_tokenizer_json_is_followed_as_written(tmp_path, checkpoints, spm_model):
    """A Llama-2-style tokenizer.json (Prepend normalizer, no pre-tokenizer) under tokenizer_class
    "LlamaTokenizerFast": transformers 5's LlamaTokenizer swaps in its own Metaspace pre-tokenizer; we run the file,
    as PreTrainedTokenizerFast does, and so agree with the sentencepiece model it came from."""
    tok = tokenizers.Tokenizer.from_file(str(checkpoints["converted"] / "tokenizer.json"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    ours, hf = Tokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    for text in TEXTS + [" leading", "  two"]:
        assert ours.encode(text) == hf.encode(text) == [1] + sp.encode(text)


def test_openai_messages_parse_tool_call_arguments_as_vllm_does():
    """An assistant's tool-call arguments (a JSON string in the OpenAI API) become objects; empty ones {}; an
    empty tool_calls list is dropped; other roles and objects are left alone; the input is not changed."""
    call = lambda arguments: {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}  # noqa: E731
    sent = [{"role": "user", "content": "x", "tool_calls": [call("{}")]},
            {"role": "assistant", "content": None, "tool_calls": [call('{"a": [1, 2]}'), call(""), call({"b": 1})]},
            {"role": "assistant", "content": "y", "tool_calls": []}]
    before = json.loads(json.dumps(sent))
    out = openai_messages(sent)
    assert out[0] == sent[0]
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [{"a": [1, 2]}, {}, {"b": 1}]
    assert out[2] == {"role": "assistant", "content": "y"}
    assert sent == before
    with pytest.raises(ValueError, match="tool call 'f': arguments must be a JSON object"):
        openai_messages([{"role": "assistant", "tool_calls": [call("{a: 1")]}])
