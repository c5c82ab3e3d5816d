"""IncrementalDetokenizer fuzzed against whole-sequence decoding, on tokenizers built here (no hub downloads).

The promise checked: for any prompt ids and generated ids, the streamed pieces concatenate to the generated ids'
text in the context of the prompt (``decode(prompt + generated)`` less the prompt's own text), every piece is final
(each intermediate text is a prefix of the final one), no piece but the flushed one ends in an unfinished character.

Checkpoints (the reference is the same ``Tokenizer``'s ``decode``, itself compared with transformers 5 in
test_tokenizer.py):
- ``bpe``: byte-level BPE tokenizer.json (GPT-2/Llama-3 style, lossy UTF-8 decoding), special and added tokens.
- ``spm``: tokenizer.model only (sentencepiece with byte fallback; each bad byte decodes to U+FFFD).
- ``converted``: transformers 5's tokenizer.json for ``spm`` (Replace, ByteFallback, Fuse, Strip decoders; a byte
  run with any bad byte decodes wholly to U+FFFD).
- ``metaspace``: ``converted`` with a Metaspace decoder (prepend_scheme "first"), as Mistral-style files have.
"""

import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tokenizer import CORPUS, _make_bpe, _make_spm, _train_spm
from transformers import AutoTokenizer

from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

FFFD = "\ufffd"
BYTE_FALLBACK_DECODERS = {"converted", "metaspace"}  # tokenizers' ByteFallback: a bad byte spoils its whole run
_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")
# Text whose tokens split multi-byte characters (in byte-level BPE) or fall back to bytes (rare CJK in sentencepiece).
SNIPPETS = CORPUS[:7] + ["龘鬱躑躅 醍醐 𠀋𡈽 饕餮", "🧑‍🚀🫠 🇯🇵 Ωμέγα ѮѰ ﷺ", "x 龘鬱 y\n"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Tokenizer, set[int]]]:
    """name -> (tokenizer, the ids that skip_special_tokens drops)."""
    root = tmp_path_factory.mktemp("detok")
    dirs = {name: root / name for name in ("bpe", "spm", "converted", "metaspace")}
    for d in dirs.values():
        d.mkdir()
    _make_bpe(dirs["bpe"])
    _make_spm(dirs["spm"], _train_spm())
    AutoTokenizer.from_pretrained(dirs["spm"]).save_pretrained(dirs["converted"])
    spec = json.loads((dirs["converted"] / "tokenizer.json").read_text(encoding="utf-8"))
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}]}
    (dirs["metaspace"] / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (dirs["metaspace"] / "tokenizer_config.json").write_text(
        (dirs["converted"] / "tokenizer_config.json").read_text(encoding="utf-8"), encoding="utf-8")
    tokenizers = {name: Tokenizer.from_pretrained(d) for name, d in dirs.items()}
    return {name: (tok, _special_ids(tok)) for name, tok in tokenizers.items()}


def _stream(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in gen] + [detok.flush()]
    assert "".join(pieces) == detok.text
    return pieces


def expected_text(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool) -> str:
    """The generated ids' text: decode(prompt + generated) less the prompt's text. Where the prompt ends inside a
    character (its text ends in U+FFFD) that the generated ids finish, the character is generated text: the prompt's
    text is then only the part the whole decode agrees with."""
    full, prompt_text = tok.decode(prompt + gen, skip), tok.decode(prompt, skip)
    common = os.path.commonprefix([full, prompt_text])
    assert common == prompt_text or prompt_text.endswith(FFFD), (prompt, gen, full, prompt_text)
    return full[len(common):]


def _bad_byte_run_reaches(tok: Tokenizer, specials: set[int], ids: list[int], start: int, skip: bool) -> bool:
    """Whether a run of byte tokens holding invalid UTF-8 reaches ids[start:]. The tokenizers ByteFallback decoder
    turns such a whole run into U+FFFD, retracting characters already streamed (documented on
    IncrementalDetokenizer): exact equality is not promised there."""
    run, run_end = bytearray(), -1

    def bad() -> bool:
        try:
            run.decode("utf-8")
            return False
        except UnicodeDecodeError:
            return run_end >= start

    for n, i in enumerate(ids):
        if skip and i in specials:
            continue  # dropped before the decoder sees the tokens: the run goes on across it
        match = _BYTE_TOKEN.fullmatch(tok.id_to_token(i) or "")
        if match:
            run.append(int(match.group(1), 16))
            run_end = n
        elif run:
            if bad():
                return True
            run.clear()
    return bool(run) and bad()


@st.composite
def _ids(draw, tok: Tokenizer, pools: dict[str, list[int]], max_size: int) -> list[int]:
    """A mix of pieces of real text (cut anywhere, so characters split), byte tokens, special tokens and any id."""
    parts = []
    for kind in draw(st.lists(st.sampled_from(["text", "bytes", "special", "any"]), max_size=4)):
        if kind == "text":
            ids = pools["snippets"][draw(st.integers(0, len(pools["snippets"]) - 1))]
            start = draw(st.integers(0, len(ids)))
            parts += ids[start:start + draw(st.integers(0, max_size))]
        elif kind == "any":
            parts += draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=4))
        else:
            parts += draw(st.lists(st.sampled_from(pools[kind]), min_size=1, max_size=7))
    return parts[-max_size:]


def _pools(tok: Tokenizer, specials: set[int]) -> dict[str, list[int]]:
    byte_ids = [i for i in range(tok.vocab_size) if _BYTE_TOKEN.fullmatch(tok.id_to_token(i) or "")]
    if not byte_ids:  # byte-level BPE: the 256 single-byte tokens
        byte_ids = [i for i in range(tok.vocab_size) if len(tok.id_to_token(i) or "") == 1][:256]
    return {"snippets": [tok.encode(s, add_special_tokens=False) for s in SNIPPETS], "bytes": byte_ids,
            "special": sorted(specials | set(tok.eos_ids))}


def _special_ids(tok: Tokenizer) -> set[int]:
    return {i for i in range(tok.vocab_size) if tok.decode([i], True) == "" != tok.decode([i], False)}


def _check(name: str, tok: Tokenizer, specials: set[int], prompt: list[int], gen: list[int], skip: bool):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in gen] + [detok.flush()]
    assert "".join(pieces) == detok.text
    assert not any(p.endswith(FFFD) for p in pieces[:-1]), pieces  # held back until the character completes
    if name in BYTE_FALLBACK_DECODERS and _bad_byte_run_reaches(tok, specials, prompt + gen, len(prompt), skip):
        return
    expected = expected_text(tok, prompt, gen, skip)
    if name in BYTE_FALLBACK_DECODERS and not tok.decode(prompt + gen, skip).startswith(tok.decode(prompt, skip)):
        # The prompt ends inside a byte run, all U+FFFD in decode(prompt), which the generated ids finish: the
        # stream rereads only the prompt's last few ids, so the run's earlier characters stay prompt text.
        assert expected.endswith(detok.text), (prompt, gen, skip, pieces, expected)
        return
    assert detok.text == expected, (prompt, gen, skip, pieces, expected)
    if not prompt:
        assert detok.text == tok.decode(gen, skip)
    # Each piece comes as soon as its characters are whole: what is held back is an unfinished character.
    text = ""
    for n, piece in enumerate(pieces[:-1]):
        text += piece
        if name in BYTE_FALLBACK_DECODERS and _bad_byte_run_reaches(tok, specials, prompt + gen[:n + 1], len(prompt),
                                                                   skip):
            continue  # an unfinished byte run here, which the ids after it finish
        so_far = expected_text(tok, prompt, gen[:n + 1], skip)
        assert so_far.startswith(text) and (so_far == text or so_far.endswith(FFFD)), (prompt, gen[:n + 1], text)


def _assert_streams(name: str, checkpoints, text: str):
    """Every split of ``text``'s ids into prompt and generated ids streams as decoding says."""
    tok, specials = checkpoints[name]
    ids = tok.encode(text, add_special_tokens=False)
    for cut in range(len(ids) + 1):
        for skip in (True, False):
            _check(name, tok, specials, ids[:cut], ids[cut:], skip)


@pytest.mark.parametrize("name", ["bpe", "spm", "converted", "metaspace"])
def test_stream_equals_decode_in_context(checkpoints, name):
    tok, specials = checkpoints[name]
    pools = _pools(tok, specials)

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(prompt=_ids(tok, pools, 24), gen=_ids(tok, pools, 24), skip=st.booleans())
    def check(prompt, gen, skip):
        _check(name, tok, specials, prompt, gen, skip)

    check()


def test_character_split_across_prompt_and_generation(checkpoints):
    """A prompt that ends inside a character (prompts may be given as ids) and generated ids that finish it: the
    character is generated text, as in decode(prompt + generated), and is not dropped."""
    _assert_streams("bpe", checkpoints, "日本語のテキスト")
    tok = checkpoints["bpe"][0]
    ids = tok.encode("日本語のテキスト", add_special_tokens=False)
    assert tok.decode(ids[:2]) == "日本語の" + FFFD  # "テ" starts in ids[1]
    assert "".join(_stream(tok, ids[:2], ids[2:], True)) == "テキスト"


@pytest.mark.parametrize("name", ["spm", "converted", "metaspace"])
def test_prompt_context_starts_on_a_character_boundary(checkpoints, name):
    """Rare CJK in a Llama-2-style tokenizer is spelled in byte tokens, and a prompt's last few ids may begin inside
    a character. Under the ByteFallback decoder that spoiled the whole byte run: generated characters came out as
    U+FFFD."""
    _assert_streams(name, checkpoints, "x 龘鬱躑躅 y")
    tok = checkpoints[name][0]
    ids = tok.encode("x 龘鬱躑躅 y", add_special_tokens=False)
    assert "".join(_stream(tok, ids[:9], ids[9:], True)) == "躑躅 y"  # the prompt's last 5 ids begin inside 龘


@pytest.mark.parametrize("name", ["bpe", "spm", "converted", "metaspace"])
def test_prompt_ending_in_skipped_special_tokens(checkpoints, name):
    """The prompt's text before its last special tokens still precedes the generated text: a sentencepiece-style
    first generated word keeps its leading space however many skipped special tokens end the prompt."""
    tok, specials = checkpoints[name]
    prompt = tok.encode("a b", add_special_tokens=False) + [min(specials)] * 6
    gen = tok.encode("a c d", add_special_tokens=False)[1:]
    _check(name, tok, specials, prompt, gen, True)
    assert "".join(_stream(tok, prompt, gen, True)) == " c d"


def test_skipped_special_tokens_cost_nothing(checkpoints):
    """Generated special tokens that skip_special_tokens drops (an EOS repeated under ignore_eos) are not decoded
    again at every later token: decoding stays linear in the output length."""
    tok, specials = checkpoints["converted"]
    decoded = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), prompt_ids=tok.encode("a b"), skip_special_tokens=True)
    for _ in range(1000):
        detok.add(min(specials))
    for token_id in tok.encode("a c", add_special_tokens=False)[1:]:
        detok.add(token_id)
    assert detok.text + detok.flush() == " c"
    assert sum(decoded) < 100, sum(decoded)
