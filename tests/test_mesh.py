"""Tensor and data parallelism on 8 fake CPU devices: every layout decodes the same greedy tokens as one device,
from a safetensors checkpoint loaded straight onto its shards; the shardings are read back, not assumed.

The layouts run in one subprocess (tests/mesh_run.py), since JAX fixes its device count at start-up."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxinfer.config import ConfigError, EngineConfig
from jaxinfer.llm import LLM, load_engine
from jaxinfer.model.checkpoint import DEFAULT_MODEL_DIR, save_safetensors

PARTIAL_REGEX = r"[a-z]*( [0-9]{0,2})?"  # what mesh_run.py's STRUCTURED_REGEX allows, cut anywhere
LAYOUTS = ["1,1,reference", "1,2,reference", "1,4,reference", "4,1,reference", "2,2,pallas", "1,2,xla", "2,1,xla"]
# An fp8 KV cache: e5m2, whose greedy tokens here differ from the float32 cache's (e4m3's do not).
FP8_LAYOUTS = ["1,1,reference,fp8_e5m2", "1,2,pallas,fp8_e5m2", "2,1,xla,fp8_e5m2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("default-safetensors")
    llm = LLM(engine=EngineConfig(max_slots=1, max_model_len=64))
    save_safetensors(llm.runner.params, llm.model_config, DEFAULT_MODEL_DIR, checkpoint)
    script = Path(__file__).with_name("mesh_run.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(checkpoint), *LAYOUTS, *FP8_LAYOUTS], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    names = (",".join(map(str, [*r["layout"], r["backend"]] + ([r["kv_cache_dtype"]] if "kv_cache_dtype" in r else [])))
             for r in results)
    return dict(zip(names, results))


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layout_decodes_what_one_device_decodes(runs, layout):
    assert runs[layout]["tokens"] == runs["1,1,reference"]["tokens"]
    assert runs[layout]["bad_words_tokens"] == runs["1,1,reference"]["bad_words_tokens"]
    assert runs[layout]["structured_tokens"] == runs["1,1,reference"]["structured_tokens"]


@pytest.mark.parametrize("layout", FP8_LAYOUTS[1:])
def test_fp8_kv_cache_shards_and_decodes_what_one_device_decodes(runs, layout):
    """An fp8 pool sharded over KV heads (the Pallas kernels under shard_map) or split over data shards."""
    one, run = runs[FP8_LAYOUTS[0]], runs[layout]
    assert run["kv_dtype"] == one["kv_dtype"] == "float8_e5m2"
    assert run["kv"]["spec"][:3] == ([None, "model"] if layout.startswith("1,2") else [None, None, "data"])
    assert run["tokens"] == one["tokens"]
    assert one["tokens"] != runs["1,1,reference"]["tokens"]  # the narrow cache is what was compared


@pytest.mark.parametrize("layout", ["2,2,pallas", "1,2,pallas,fp8_e5m2"])
def test_pallas_steps_under_shard_map_lower_for_cuda(runs, layout):
    """Every step shape a Pallas layout compiled (data and tensor parallel, an fp8 pool) also lowers for an
    NVIDIA GPU, the kernels per device under shard_map as Triton calls."""
    lowered = runs[layout]["cuda"]
    assert len(lowered) >= 3 and all(lowered)


def test_bad_words_changed_the_one_device_output(runs):
    """What the layouts are compared on: "and" (one token) and "of the" (two) steered three of the prompts."""
    one = runs["1,1,reference"]
    changed = [a != b for a, b in zip(one["tokens"], one["bad_words_tokens"])]
    assert changed == [True, False, True, True]


def test_structured_outputs_held_on_one_device(runs):
    """What the layouts are compared on: two regex answers, a JSON one (cut at max_tokens) and a plain one."""
    texts = runs["1,1,reference"]["structured_texts"]
    assert all(re.fullmatch(PARTIAL_REGEX, texts[i]) for i in (0, 3)) and texts[0] and texts[3]
    assert texts[2].startswith('{"n":') and not re.fullmatch(PARTIAL_REGEX, texts[1])


def test_tensor_parallel_shards_heads_and_the_pool(runs):
    run = runs["1,2,reference"]
    assert run["wq"]["spec"] == [None, None, "model", None] and run["wq"]["local"] == [4, 256, 2, 64]
    assert run["wk"]["local"] == [4, 256, 1, 64]  # 2 KV heads over 2 devices
    assert run["embed"]["spec"] == ["model", None] and run["embed"]["local"] == [2048, 256]
    assert run["kv"]["spec"][:2] == [None, "model"] and run["kv"]["local"][1] == 1


def test_more_devices_than_kv_heads_replicates_them(runs):
    run = runs["1,4,reference"]
    assert run["wk"]["shape"] == [4, 256, 4, 64] and run["wk"]["local"] == [4, 256, 1, 64]  # 2 heads x 2 copies
    assert run["kv"]["shape"][1] == 4 and run["kv"]["local"][1] == 1 and run["kv"]["devices"] == 4


def test_data_parallel_splits_slots_and_pages(runs):
    run = runs["4,1,reference"]
    assert run["slots"]["spec"] == ["data"] and run["slots"]["local"] == [1]
    assert run["kv"]["shape"][2] == 32 and run["kv"]["local"][2] == 8  # each shard its 8 pages
    mixed = runs["2,2,pallas"]
    assert mixed["kv"]["spec"][:3] == [None, "model", "data"]
    assert mixed["kv"]["local"][1:3] == [1, 16] and mixed["kv"]["devices"] == 4
    assert mixed["slots"]["local"] == [4] and mixed["decode_rows"] == [2, 4]  # decode-only steps ran 2 rows a shard


def test_sizes_that_do_not_divide_are_refused_up_front():
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not a multiple of the 'model' axis \\(3\\)"):
        load_engine(None, EngineConfig(max_slots=3, mesh_shape=(1, 3)))
    with pytest.raises(ConfigError, match="max_slots=3 is not a multiple of the 'data' axis \\(2\\)"):
        load_engine(None, EngineConfig(max_slots=3, mesh_shape=(2, 1)))
