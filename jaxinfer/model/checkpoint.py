"""Finding and reading a model: Hugging Face directories, our orbax conversions, the embedded default.

A model directory holds `config.json` and either safetensors (Hugging Face
layout) or an orbax tree written by `jaxinfer convert` (marked by
`jaxinfer_checkpoint.json`). With no path, the embedded default model is used: a
small Llama trained on the King James Bible (scripts/train_demo_model.py), shipped in
the package as a Hugging Face checkpoint. A config .json alone gives random weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.model import safetensors_io
from jaxinfer.model.safetensors_io import CheckpointError
from jaxinfer.model.weights import abstract_params, init_params, load_safetensors, to_hf_tensors

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"
RANDOM_WEIGHTS_SEED = 0
ORBAX_MARKER = "jaxinfer_checkpoint.json"
ORBAX_PARAMS = "params"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's config, weights and tokenizer files are."""

    config_path: Path
    weights: Path | None  # None: deterministic random weights from RANDOM_WEIGHTS_SEED

    @property
    def directory(self) -> Path:  # tokenizer and generation config live beside config.json
        return self.config_path.parent


def find_model(path: str | Path | None) -> ModelSource:
    """None: the embedded default; a .json file: random weights of that shape; else a checkpoint dir."""
    if path is None:
        return ModelSource(DEFAULT_MODEL_DIR / "config.json", DEFAULT_MODEL_DIR)
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return ModelSource(path, None)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is neither a checkpoint directory nor a config .json file")
    if not (path / "config.json").exists():
        raise CheckpointError(f"no config.json in {path}")
    return ModelSource(path / "config.json", path)


def load_config(source: ModelSource, overrides: dict | None = None) -> ModelConfig:
    """The model's config (`overrides`: vLLM's --hf-overrides, laid over config.json)."""
    cfg = ModelConfig.from_json(source.config_path, overrides)
    eos = tuple(dict.fromkeys(cfg.eos_token_ids + _generation_eos(source.directory)))
    return dataclasses.replace(cfg, eos_token_ids=eos)


# What vLLM takes from generation_config.json as default sampling parameters (a request's own values win), by
# the names a request uses: max_new_tokens is the default max_tokens of chat requests that send none (a default,
# not a ceiling, since vLLM's #34063) and of `LLM.get_default_sampling_params()`.
GENERATION_DEFAULT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(choice: str, model: str | Path | None) -> dict:
    """vLLM's --generation-config: "auto" reads the model's generation_config.json, "vllm" reads nothing, any
    other value is a folder holding one. -> the sampling fields it sets (GENERATION_DEFAULT_FIELDS)."""
    if choice == "vllm":
        return {}
    directory = find_model(model).directory if choice == "auto" else Path(choice).expanduser()
    values = _generation_config(directory)
    if values is None and choice != "auto":
        raise CheckpointError(f"--generation-config {choice}: no generation_config.json there")
    return {ours: values[theirs] for theirs, ours in GENERATION_DEFAULT_FIELDS.items()
            if values and values.get(theirs) is not None}


def _generation_config(directory: Path) -> dict | None:
    """The folder's generation_config.json, None where there is none."""
    path = directory / "generation_config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _generation_eos(directory: Path) -> tuple[int, ...]:
    # generation_config.json names every stop id (Llama 3 instruct lists several).
    eos = (_generation_config(directory) or {}).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


def load_params(source: ModelSource, cfg: ModelConfig, dtype: str, mesh) -> dict:
    """Weights on their shards, cast to `dtype`, from whichever format the source holds."""
    if source.weights is None:
        return init_params(cfg, jnp.dtype(dtype), RANDOM_WEIGHTS_SEED, mesh)
    directory = source.weights
    if (directory / ORBAX_MARKER).exists():
        return _restore_orbax(directory, cfg, dtype, mesh)
    hf_weights = (directory / safetensors_io.SINGLE_FILE).exists() or (directory / safetensors_io.INDEX_FILE).exists()
    if (directory / ORBAX_PARAMS).exists() and not hf_weights:
        raise CheckpointError(f"{directory} holds an unfinished `jaxinfer convert` output ({ORBAX_PARAMS}/ but no "
                              f"{ORBAX_MARKER}, which is written last): convert again")
    return load_safetensors(directory, cfg, jnp.dtype(dtype), mesh)


def _restore_orbax(directory: Path, cfg: ModelConfig, dtype: str, mesh) -> dict:
    import orbax.checkpoint as ocp  # imported on use: it is slow to import and only converted checkpoints need it
    saved_dtype = json.loads((directory / ORBAX_MARKER).read_text())["dtype"]
    target = abstract_params(cfg, jnp.dtype(saved_dtype), mesh)
    checkpointer, path = ocp.StandardCheckpointer(), (directory / ORBAX_PARAMS).resolve()
    _check_converted_shapes(_shapes(checkpointer.metadata(path).item_metadata.tree), _shapes(target), directory)
    params = checkpointer.restore(path, target)
    if saved_dtype != dtype:  # fp8 weights and their scales keep their dtypes
        params = jax.tree.map(lambda x, want: x.astype(want.dtype), params, abstract_params(cfg, jnp.dtype(dtype)))
    return params


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_converted_shapes(stored: dict, wanted: dict, directory: Path) -> None:
    # A config.json edited (or copied in) after conversion: orbax's own error names no weight.
    for name in sorted(stored.keys() | wanted.keys()):
        if stored.get(name) != wanted.get(name):
            raise CheckpointError(f"the converted weights in {directory} do not match its config.json: {name} is "
                                  f"{stored.get(name, 'absent')} there, the config needs {wanted.get(name, 'none')}; "
                                  "convert again")


def save_orbax(params: dict, dtype: str, source: Path, output: Path, quantization: dict | None = None) -> None:
    """Write `params` as an orbax tree beside the source's config and tokenizer files (`quantization`: the
    quantization_config the copied config.json then names, for weights quantized at conversion)."""
    import orbax.checkpoint as ocp
    output.mkdir(parents=True, exist_ok=True)
    # The marker goes last, so an interrupted (re)conversion leaves none and is refused rather than restored.
    (output / ORBAX_MARKER).unlink(missing_ok=True)
    # Uncompressed: weights shrink by under 10% with zstd, and decompressing doubled the restore time here.
    checkpointer = ocp.PyTreeCheckpointer(use_compression=False)
    checkpointer.save((output / ORBAX_PARAMS).resolve(), params, force=True)
    _copy_side_files(source, output)
    if quantization is not None:
        config = json.loads((output / "config.json").read_text())
        (output / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))
    (output / ORBAX_MARKER).write_text(json.dumps({"format": "orbax", "dtype": dtype}))


def save_safetensors(params: dict, cfg: ModelConfig, source: Path, output: Path,
                     max_shard_bytes: int | None = None) -> None:
    """Write `params` as a Hugging Face checkpoint (the inverse of loading)."""
    safetensors_io.save(to_hf_tensors(params, cfg), output, max_shard_bytes)
    _copy_side_files(source, output)


def _copy_side_files(source: Path, output: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).exists() and source.resolve() != output.resolve():
            shutil.copy2(source / name, output / name)


__all__ = ["CheckpointError", "ConfigError", "ModelSource", "find_model", "load_config", "load_params",
           "save_orbax", "save_safetensors"]
