"""Tensor and data parallelism across model families and mesh shapes on 8 fake CPU devices: every accepted mesh
decodes the unsharded engine's greedy tokens (which are transformers'), the same seeded samples under top-k,
top-p, min-p, penalties, logit biases and allowed token ids, and the same logprobs, top alternatives and prompt
logprobs; KV heads are repeated when the 'model' axis has more devices than the model has KV heads. Shapes that
cannot work are refused before anything loads, with every problem named.

The meshes run in one subprocess (this file run as a script), since JAX fixes its device count at start-up.
Models sharing a widened config (after KV heads are repeated) reuse one another's compiled steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxinfer.config import ConfigError, EngineConfig
from jaxinfer.llm import load_engine
from jaxinfer.sharding import mesh_problems

# family, config overrides (on tests/hf_models.py's COMMON), backend, meshes (data, model) after the (1, 1) baseline,
# whether greedy rows ask for prompt logprobs (a step shape of its own, so one case only: compiling is the cost)
CASES = {
    "llama-k1": ("llama2", dict(num_attention_heads=8, num_key_value_heads=1, head_dim=16), "reference",
                 [(1, 8), (4, 2)], True),
    "qwen2-k1-tied": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=1, head_dim=16), "reference",
                      [(2, 4)], False),
    "qwen3-qknorm": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16), "xla", [(1, 4)], False),
    "mistral-window": ("mistral", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16, sliding_window=12),
                       "reference", [(1, 8)], False),
    # q/k/v and gate/up cut from fused tensors, then split over 'model'.
    "phi3-fused": ("phi3", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16), "xla", [(1, 4)], False),
    # Experts split over 'model' by their width (every device holds every expert's slice), a shared expert too;
    # a leading dense layer (mlp_only_layers), its stack split as a dense model's.
    "qwen2-moe": ("qwen2_moe", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_hidden_layers=3,
                                    mlp_only_layers=[0]), "reference", [(2, 4)], False),
    # q and k normed over all heads, which split over 'model' (and KV heads repeated to fill it).
    "olmo2-qknorm": ("olmo2", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16), "xla", [(1, 4)], False),
    # Attention sinks split over 'model' with their heads, two kinds of layer (one attention call, its window
    # traced), the kernels under shard_map; biased experts (gate and up interleaved in the checkpoint) by width.
    "gpt_oss-pallas": ("gpt_oss", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16), "pallas",
                       [(1, 2)], False),
    # DeepSeek-V3's latent attention: query heads (and wkv_b) split over 'model', the pool's one latent head
    # repeated on each device.
    "deepseek-mla": ("deepseek_v3", dict(num_attention_heads=8, num_key_value_heads=8), "xla", [(1, 4)], False),
}
# Cases whose checkpoint is quantized to fp8 (block size), compared with transformers' model of the fp8 files:
# the scales shard with their weights, and repeat with the KV heads.
FP8_CASES = {"llama-k1": (16, 16)}
PROMPTS = [[5, 9, 100, 7], list(range(20, 49)), [42], list(range(200, 212))]  # 29 tokens: chunked, past the window
MAX_TOKENS = 6
EDITS = [{}, dict(logit_bias={7: 3.0, 30: 5.0, 100: -100.0}), {}, dict(allowed_token_ids=list(range(0, 256, 2)))]


def problems(shape, **sizes):
    values = dict(heads=8, kv_heads=2, mlp=128, vocab=256, slots=8, pages=None, devices=8)
    return mesh_problems(shape, **{**values, **sizes})


def test_every_problem_is_named_at_once():
    said = problems((3, 16), heads=6, kv_heads=6, mlp=100, vocab=250, slots=8, pages=32)
    assert said == ["mesh_shape (3, 16) needs 48 devices, only 8 available",
                    "num_attention_heads=6 is not a multiple of the 'model' axis (16)",
                    "intermediate_size=100 is not a multiple of the 'model' axis (16)",
                    "vocab_size=250 is not a multiple of the 'model' axis (16)",
                    "num_key_value_heads=6 neither divides among nor replicates evenly over the 'model' axis (16)",
                    "max_slots=8 is not a multiple of the 'data' axis (3)",
                    "num_pages=32 is not a multiple of the 'data' axis (3)"]


def test_kv_heads_fewer_than_devices_are_accepted_when_they_replicate_evenly():
    assert problems((1, 8), kv_heads=4) == [] and problems((1, 8), kv_heads=1) == []
    assert problems((1, 4), heads=12, kv_heads=6) == [
        "num_key_value_heads=6 neither divides among nor replicates evenly over the 'model' axis (4)"]


def test_a_data_shard_needs_a_page_besides_its_null_page():
    assert problems((4, 1), pages=4) == [
        "num_pages=4 leaves 1 page to each of the 4 data shards, which need at least 2 (a shard's page 0 is its "
        "null page): at least 8"]
    assert problems((4, 1), pages=8) == []


def test_load_engine_names_a_mesh_larger_than_the_machine_with_the_other_problems():
    need = 4 * jax.device_count() + 4  # data x model, more than this process has
    with pytest.raises(ConfigError) as refused:
        load_engine(None, EngineConfig(max_slots=need // 4, mesh_shape=(need // 4, 4), num_pages=need // 4))
    message = str(refused.value)
    assert f"needs {need} devices, only {jax.device_count()} available" in message
    assert f"leaves 1 page to each of the {need // 4} data shards" in message


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, str(tmp_path_factory.mktemp("mesh-variants"))],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return {r["case"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}


@pytest.mark.parametrize("case", CASES)
def test_unsharded_engine_decodes_what_transformers_does(runs, case):
    assert runs[case]["hf_greedy"] == runs[case]["meshes"]["1,1"]["tokens"][:len(PROMPTS)]


@pytest.mark.parametrize("case, mesh", [(c, f"{d},{m}") for c, spec in CASES.items() for d, m in spec[3]])
def test_mesh_samples_what_one_device_samples(runs, case, mesh):
    base, got = runs[case]["meshes"]["1,1"], runs[case]["meshes"][mesh]
    assert bool(base["prompt_top_ids"]) == CASES[case][4]
    assert got["tokens"] == base["tokens"]  # greedy rows, then seeded filtered and penalised samples
    assert got["top_ids"] == base["top_ids"] and got["prompt_top_ids"] == base["prompt_top_ids"]
    np.testing.assert_allclose(got["logprobs"], base["logprobs"], atol=1e-4)
    np.testing.assert_allclose(got["prompt_logprobs"], base["prompt_logprobs"], atol=1e-4)


def test_kv_heads_are_repeated_over_the_model_axis(runs):
    k1 = runs["llama-k1"]["meshes"]
    assert k1["1,8"]["wk"] == {"shape": [2, 64, 8, 16], "local": [2, 64, 1, 16]}  # 1 head x 8 copies
    assert k1["1,8"]["kv"] == {"shape": [2, 8, 32, 8, 16], "local": [2, 1, 32, 8, 16]}
    assert k1["4,2"]["kv"] == {"shape": [2, 2, 32, 8, 16], "local": [2, 1, 8, 8, 16]}  # pages split by 'data'
    assert runs["qwen2-k1-tied"]["meshes"]["2,4"]["wk"]["local"] == [2, 64, 1, 16]
    assert runs["qwen3-qknorm"]["meshes"]["1,4"]["wk"] == {"shape": [2, 64, 4, 16], "local": [2, 64, 1, 16]}
    assert runs["mistral-window"]["meshes"]["1,8"]["wk"] == {"shape": [2, 64, 8, 16], "local": [2, 64, 1, 16]}


def test_fp8_scales_shard_and_repeat_with_their_weights(runs):
    """llama-k1 is fp8: wk's scales ([L, D / 16, K, H]) repeat with its one KV head over 8 devices, wq's split
    by heads, and wo's and w_down's (blocks of their split in dims) stay whole on every device."""
    meshes = runs["llama-k1"]["meshes"]
    assert meshes["1,1"]["scales"]["wk_scale"] == {"shape": [2, 4, 1, 16], "local": [2, 4, 1, 16]}
    scales = meshes["1,8"]["scales"]
    assert scales["wk_scale"] == {"shape": [2, 4, 8, 16], "local": [2, 4, 1, 16]}
    assert scales["wq_scale"] == {"shape": [2, 4, 8, 16], "local": [2, 4, 1, 16]}
    assert scales["wo_scale"] == {"shape": [2, 8, 64], "local": [2, 8, 64]}
    assert scales["w_down_scale"] == {"shape": [2, 8, 64], "local": [2, 8, 64]}
    assert scales["w_up_scale"] == {"shape": [2, 4, 128], "local": [2, 4, 16]}
    assert not runs["qwen2-moe"]["meshes"]["1,1"]["scales"]


def test_fused_projections_split_over_the_model_axis(runs):
    phi3 = runs["phi3-fused"]["meshes"]["1,4"]
    assert phi3["wk"] == {"shape": [2, 64, 4, 16], "local": [2, 64, 1, 16]}


def test_latent_attention_splits_its_heads_and_repeats_its_latent(runs):
    mla = runs["deepseek-mla"]["meshes"]["1,4"]
    assert mla["wk"] == {"shape": [2, 32, 8, 40], "local": [2, 32, 2, 40]}  # wkv_b [L, R, N, nope + v]: N over 4
    assert mla["kv"]["local"][1] == 1 and mla["kv"]["shape"][1] == 4  # [Lg, K, P, Z, H]: the latent head, 4 copies


def test_experts_split_by_width_over_the_model_axis(runs):
    moe = runs["qwen2-moe"]["meshes"]["2,4"]
    assert moe["w_down"] == {"shape": [2, 4, 48, 64], "local": [2, 4, 12, 64]}  # [L, E, F, D]: F over 4 devices
    assert moe["wk"] == {"shape": [2, 64, 4, 16], "local": [2, 64, 1, 16]}  # 2 KV heads x 2 copies
    assert moe["dense_w_down"] == {"shape": [1, 128, 64], "local": [1, 32, 64]}  # the leading dense layer's [L, F, D]


# ---- the subprocess: python tests/test_mesh_variants.py OUTPUT_DIR (8 fake devices, set by the parent) ----

def _decode(checkpoint: str, mesh: tuple[int, int], backend: str, prompt_logprobs: bool) -> dict:
    from jaxinfer.llm import LLM, SamplingParams
    engine = EngineConfig(max_slots=4, page_size=8, prefill_chunk=16, max_model_len=64, num_pages=32, decode_steps=2,
                          mesh_shape=mesh, attention_backend=backend, dtype="float32")
    llm = LLM(checkpoint, engine)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2 if prompt_logprobs else None)
    sampled = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=i,
                              presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, ignore_eos=True,
                              logprobs=3, **EDITS[i]) for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS * 2, [greedy] * len(PROMPTS) + sampled, use_tqdm=False)
    llm.engine.check_idle()
    steps = [step for o in outs for step in o.outputs[0].logprobs]
    prompt_steps = [step for o in outs for step in (o.prompt_logprobs or [])[1:]]
    local = lambda a: {"shape": list(a.shape), "local": list(a.addressable_shards[0].data.shape)}  # noqa: E731
    values = lambda rows: [v.logprob for row in rows for _, v in sorted(row.items())]  # noqa: E731
    return {"tokens": [o.outputs[0].token_ids for o in outs],
            "top_ids": [sorted(step) for step in steps], "logprobs": values(steps),
            "prompt_top_ids": [sorted(step) for step in prompt_steps], "prompt_logprobs": values(prompt_steps),
            "wk": local(llm.runner.params["layers"].get("wk", llm.runner.params["layers"].get("wkv_b"))),
            "kv": local(llm.runner.kv.k),
            "scales": {name: local(x) for name, x in llm.runner.params["layers"].items() if name.endswith("_scale")},
            "w_down": local(llm.runner.params["layers"]["w_down"]),
            **({"dense_w_down": local(llm.runner.params["dense_layers"]["w_down"])}
               if "dense_layers" in llm.runner.params else {})}


def _child(output: Path) -> None:
    import hf_models
    import torch
    for case, (family, overrides, backend, meshes, prompt_logprobs) in CASES.items():
        checkpoint = output / case
        hf_models.FAMILIES[case] = (hf_models.FAMILIES[family][0], {**hf_models.FAMILIES[family][1], **overrides})
        model = hf_models.build(case, checkpoint)
        if case in FP8_CASES:
            model = hf_models.quantize_fp8(checkpoint, FP8_CASES[case])
        with torch.no_grad():
            hf = [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
                  for p in PROMPTS]
        results = {f"{d},{m}": _decode(str(checkpoint), (d, m), backend, prompt_logprobs) for d, m in [(1, 1)] + meshes}
        print(json.dumps({"case": case, "hf_greedy": hf, "meshes": results}), flush=True)


if __name__ == "__main__":
    _child(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
