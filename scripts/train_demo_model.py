"""Train jaxinfer's embedded demo model: a 4-layer Llama (4.2M parameters) with its own sentencepiece tokenizer,
on the King James Bible, written as a Hugging Face checkpoint (safetensors, config.json, tokenizer files).

    bash scripts/get_kjv.sh kjv.txt
    pip install -e ".[train,test]"   # optax (training only) and transformers (the tokenizer.json conversion)
    python scripts/train_demo_model.py --corpus kjv.txt --out jaxinfer/assets/default --heldout kjv-heldout.txt

Every 50th block of 100 verses is held out (about 2%) and written to --heldout, for
`jaxinfer eval perplexity --input kjv-heldout.txt`. The model's forward pass is built from the same
functions the engine runs (`jaxinfer.model.transformer`), with dense causal attention in place of the paged
pool, so what is trained is what is served. Training runs on whatever JAX finds (CPU is fine: about
25 minutes for the default 1,500 steps on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm

from jaxinfer.config import ModelConfig
from jaxinfer.model import safetensors_io
from jaxinfer.model.transformer import apply_rope, logits, mlp, qkv, rms_norm, rope_frequencies
from jaxinfer.model.weights import init_params, to_hf_tensors

VOCAB = 4096
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ids 3 and 4, after <unk> <s> </s>
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 256,
    "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": [2, 4], "torch_dtype": "bfloat16",
}


def split(corpus: Path) -> tuple[list[str], list[str]]:
    verses = [line.strip() for line in corpus.read_text().splitlines() if line.strip()]
    held = [v for i, v in enumerate(verses) if (i // 100) % 50 == 49]
    train = [v for i, v in enumerate(verses) if (i // 100) % 50 != 49]
    return train, held


def train_tokenizer(train: list[str], out: Path) -> spm.SentencePieceProcessor:
    text = out / "train-verses.txt"
    text.write_text("\n".join(train) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", split_digits=True,
        user_defined_symbols=list(CHAT_TOKENS), unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2,
        max_sentence_length=20000, minloglevel=2)
    text.unlink()
    (out / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))


def write_side_files(out: Path) -> None:
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 4]}) + "\n")
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True}
             for i, c in enumerate(("<unk>", "<s>", "</s>") + CHAT_TOKENS)}
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "add_prefix_space": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 2048, "added_tokens_decoder": added,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The tokenizer.json transformers builds from tokenizer.model, shipped beside it: engines that read
    # tokenizer.json (ours, vLLM) and transformers then tokenize identically.
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    for noise in ("is_local", "local_files_only", "backend"):
        saved.pop(noise, None)
    (out / "tokenizer_config.json").write_text(json.dumps(saved, indent=2) + "\n")


def token_stream(sp: spm.SentencePieceProcessor, verses: list[str]) -> np.ndarray:
    newline = sp.encode("\n")[-1:]  # a byte-fallback token: verses end with a line break
    return np.asarray([t for v in verses for t in sp.encode(v) + newline], np.int32)


def forward(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] of a dense causal pass, from the engine's own layer functions."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    inv_freq = rope_frequencies(cfg.rope, cfg.head_dim)
    causal = jnp.tril(jnp.ones((T, T), bool))

    def layer(h, lp):
        q, k, v = qkv(lp, cfg, rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v = (jnp.repeat(x, cfg.q_per_kv, axis=2) for x in (k, v))
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) * cfg.head_dim ** -0.5
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        h = h + jnp.einsum("BTNH,NHD->BTD", jnp.einsum("BNTS,BSNH->BTNH", probs, v), lp["wo"])
        return h + mlp(lp, cfg, rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)), None

    h, _ = jax.lax.scan(layer, params["embed"][tokens], params["layers"])
    return logits(params, cfg, rms_norm(h, params["final_norm"], cfg.rms_norm_eps))


def loss_fn(params, cfg, batch):
    logp = jax.nn.log_softmax(forward(params, cfg, batch[:, :-1]), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


def batches(stream: np.ndarray, bos: int, size: int, length: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(stream) - length, size)
        body = np.stack([stream[s:s + length] for s in starts])
        yield np.concatenate([np.full((size, 1), bos, np.int32), body], axis=1)  # BOS, as the tokenizer adds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    train, held = split(args.corpus)
    args.heldout.write_text("\n".join(held) + "\n")
    sp = train_tokenizer(train, args.out)
    write_side_files(args.out)
    cfg = ModelConfig.from_hf(CONFIG)
    stream, held_stream = token_stream(sp, train), token_stream(sp, held)
    print(f"{len(train)} training verses ({len(stream)} tokens), {len(held)} held out ({len(held_stream)} tokens)")

    params = init_params(cfg, jnp.float32, args.seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10), args.steps, args.lr / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    data = batches(stream, sp.bos_id(), args.batch, args.length, np.random.default_rng(args.seed))
    losses = []
    for i in range(args.steps):
        params, state, loss = step(params, state, jnp.asarray(next(data)))
        losses.append(float(loss))
        if (i + 1) % 50 == 0 or i == 0:
            print(f"step {i + 1}/{args.steps}: loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - start:.0f}s)",
                  flush=True)

    held_batches = batches(held_stream, sp.bos_id(), args.batch, args.length, np.random.default_rng(1))
    held_loss = np.mean([float(jax.jit(loss_fn, static_argnums=1)(params, cfg, jnp.asarray(next(held_batches))))
                         for _ in range(8)])
    print(f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f} per token) after "
          f"{time.perf_counter() - start:.0f}s")
    tensors = {k: np.asarray(v).astype(jnp.bfloat16) for k, v in to_hf_tensors(params, cfg).items()}
    safetensors_io.save(tensors, args.out)


if __name__ == "__main__":
    main()
