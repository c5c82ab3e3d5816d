"""Train the tokenizer of jaxinfer's built-in default model and write it to jaxinfer/assets/default/.

A byte-level BPE (every UTF-8 text round-trips through the 256 byte tokens) with 4096 ids, trained on the English
license texts every Debian-like machine carries, in sorted path order with duplicate files skipped, so a rerun on
the same machine reproduces the files. BOS is prepended by the tokenizer.json post-processor, which is what
transformers 5 follows for a tokenizer.json checkpoint, so jaxinfer and transformers agree.

Usage: python scripts/train_default_tokenizer.py [--out DIR] [--max-bytes N]
"""

import argparse
import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)  # ids 0..3, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SOURCES = (("/usr/share/common-licenses", "*"), ("/usr/share/doc", "*/copyright"))  # (folder, glob)


def corpus_files(max_bytes: int) -> list[Path]:
    """English text files in a fixed order, skipping exact duplicates (many packages ship the same license)."""
    chosen, seen, total = [], set(), 0
    for root, glob in SOURCES:
        for path in sorted(Path(root).glob(glob)):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).digest()
            if digest in seen or total + len(data) > max_bytes:
                continue
            seen.add(digest)
            chosen.append(path)
            total += len(data)
    return chosen


def read_texts(files: list[Path]):
    for path in files:
        yield path.read_bytes().decode("utf-8", errors="replace")


def train(files: list[Path]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_texts(files), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def configs(tokenizer: Tokenizer) -> tuple[dict, dict]:
    added = {
        str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": [tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)],
    }
    return tokenizer_config, generation_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "jaxinfer/assets/default")
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    args = parser.parse_args()
    files = corpus_files(args.max_bytes)
    if not files:
        raise SystemExit(f"no training text found in {[f'{root}/{glob}' for root, glob in SOURCES]}")
    total = sum(f.stat().st_size for f in files)
    print(f"training on {len(files)} files, {total / 1e6:.2f} MB:")
    for f in files:
        print(f"  {f}")
    tokenizer = train(files)
    tokenizer_config, generation_config = configs(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        (args.out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    size = (args.out / "tokenizer.json").stat().st_size
    print(f"wrote {args.out}: vocab {tokenizer.get_vocab_size()}, tokenizer.json {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
