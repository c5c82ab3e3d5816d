"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded).

Host code: numpy arrays in, numpy arrays out (bfloat16 through ml_dtypes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # header names; int, uint, bool and F8_* are quantized or not weights
FP8_DTYPE = "F8_E4M3"  # an fp8 checkpoint's weights (safetensors' numpy reader has no float8: we read the bytes)


class CheckpointError(ValueError):
    """A checkpoint that is unreadable or does not match the model config, with the key at fault."""


class Reader:
    """Key → tensor lookup over the safetensors files of one checkpoint directory."""

    def __init__(self, directory: Path):
        self._open: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}  # fp8 reads: where the data starts, and the header
        self._files: dict[str, Path] = self._map_keys(directory)

    def _map_keys(self, directory: Path) -> dict[str, Path]:
        # The single file first, as transformers looks: re-saving a sharded checkpoint unsharded leaves the old
        # index behind (save_pretrained deletes the shards, not the index).
        single, index = directory / SINGLE_FILE, directory / INDEX_FILE
        if single.exists():
            return {key: single for key in self._handle(single).keys()}
        if not index.exists():
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"corrupt safetensors index {index}: {e}") from e
        return {key: directory / name for key, name in weight_map.items()}

    def _handle(self, path: Path):
        if path not in self._open:
            if not path.exists():
                raise CheckpointError(f"safetensors file {path} named in the index does not exist")
            try:
                self._open[path] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
        return self._open[path]

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def keys(self):
        return self._files.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading it."""
        path = self._files[key]
        try:
            return tuple(self._handle(path).get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {path}: {e}") from e

    def dtype(self, key: str) -> str:
        """A tensor's dtype name from the file header (F32, BF16, F8_E4M3, ...)."""
        path = self._files[key]
        try:
            return self._handle(path).get_slice(key).get_dtype()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {path}: {e}") from e

    def check_dtype(self, key: str, fp8: bool = False, packed: bool = False) -> None:
        """Refuse a tensor that is not 16/32/64-bit floating point (`fp8`: float8_e4m3fn, an fp8 checkpoint's
        weight; `packed`: bytes, an MXFP4 checkpoint's blocks and scales), from the file header, before reading
        it: quantized weights (int8, packed int4, fp8 where the config says none) would cast to wrong floats or
        not read at all."""
        dtype = self.dtype(key)
        if packed:
            if dtype != "U8":
                raise CheckpointError(f"tensor {key!r} is {dtype}, but an MXFP4 checkpoint's blocks and scales are U8")
            return
        if fp8 and dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor {key!r} is {dtype}, but config.json's quantization_config makes it an fp8 "
                                  f"weight ({FP8_DTYPE}): add its module to modules_to_not_convert (compressed-"
                                  "tensors: ignore)")
        if not fp8 and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {key!r} is {dtype}, not 16/32/64-bit floating point: quantized checkpoints "
                                  "are supported as fp8 weights named by config.json's quantization_config only; "
                                  "use those, or the unquantized float16/bfloat16/float32 weights")

    def get(self, key: str, fp8: bool = False, packed: bool = False) -> np.ndarray:
        self.check_dtype(key, fp8, packed)
        path = self._files[key]
        try:
            if fp8:
                return self._fp8(path, key)
            return self._handle(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {path}: {e}") from e

    def _fp8(self, path: Path, key: str) -> np.ndarray:
        """An F8_E4M3 tensor as its bits (uint8), read from the file's bytes (its offsets in the JSON header)."""
        if path not in self._headers:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + size, json.loads(f.read(size)))
        data_start, header = self._headers[path]
        start, end = header[key]["data_offsets"]
        with open(path, "rb") as f:
            f.seek(data_start + start)
            data = f.read(end - start)
        return np.frombuffer(data, np.uint8).reshape(header[key]["shape"])


def save(tensors: dict[str, np.ndarray], directory: Path, max_shard_bytes: int | None = None) -> None:
    """Write `model.safetensors`, or shards plus an index when over `max_shard_bytes`."""
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += t.nbytes
    shards.append(current)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
