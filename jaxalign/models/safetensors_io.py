"""Streaming reads and writes of (sharded) ``safetensors`` files, one tensor at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the raw little-endian tensor bytes. Reading here uses
``os.pread`` instead of a memory map, so a tensor's bytes are copied once into a buffer this
process owns and no page of the file stays mapped (a mapped file's pages count towards the
process's resident memory); rows can be read in chunks, so converting a tensor to another
dtype or layout never holds two full copies of it. Writing computes every offset from shapes
first, then streams each tensor's bytes, so a checkpoint is never assembled in memory.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["INDEX_NAME", "TensorWrite", "checkpoint_tensors", "file_tensors", "parse_size",
           "read_rows", "write_checkpoint", "write_file"]

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
           "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class TensorInfo(NamedTuple):
    """Where one stored tensor lives: its file, dtype, shape and absolute byte offset."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def file_tensors(path: str) -> dict[str, TensorInfo]:
    """Every tensor of the one safetensors file ``path`` (read from its header)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which is not"
                             " supported")
        begin, _ = entry["data_offsets"]
        infos[name] = TensorInfo(path, np.dtype(_DTYPES[entry["dtype"]]),
                                 tuple(entry["shape"]), base + begin)
    return infos


def checkpoint_tensors(path: str) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint directory ``path``: the files listed by
    ``model.safetensors.index.json``, else ``model.safetensors`` (as transformers reads it, so a
    PEFT ``adapter_model.safetensors`` beside it is not the model's), else every
    ``*.safetensors`` file in it."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise ValueError(f"path={path!r} has no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(file_tensors(os.path.join(path, name)))
    return tensors


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``[start, stop)`` of the leading axis of a stored tensor, in its stored dtype."""
    stop = (info.shape[0] if info.shape else 1) if stop is None else stop
    row_shape = info.shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * info.dtype.itemsize
    out = np.empty((stop - start, *row_shape) if info.shape else (), info.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done, offset = 0, info.offset + start * row_bytes
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{info.file}: truncated tensor data")
            done += got
    finally:
        os.close(fd)
    return out


def parse_size(size: int | str) -> int:
    """Bytes of ``"5GB"``, ``"500MB"``, ``"100KB"`` (powers of 1000, as Hugging Face) or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected e.g. '5GB' or a number of bytes")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(float(match.group(1)) * units[match.group(2)])


class TensorWrite(NamedTuple):
    """One tensor to write: its name, dtype, shape and a function producing its values."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _shards(tensors: Sequence[TensorWrite], max_bytes: int) -> list[list[TensorWrite]]:
    shards: list[list[TensorWrite]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_file(path: str, tensors: Sequence[TensorWrite]) -> None:
    """Writes ``tensors`` as the one safetensors file ``path`` (each produced and written in
    turn); nothing else in its directory is touched."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": _NAMES[np.dtype(tensor.dtype)],
                               "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad the header to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for tensor in tensors:
            values = np.ascontiguousarray(tensor.values(), dtype=tensor.dtype)
            if values.shape != tuple(tensor.shape):
                raise ValueError(f"{tensor.name}: produced shape {values.shape}, expected"
                                 f" {tuple(tensor.shape)}")
            f.write(memoryview(values.reshape(-1).view(np.uint8)))
            del values


def write_checkpoint(directory: str, tensors: Sequence[TensorWrite], *,
                     max_shard_size: int | str = "5GB") -> list[str]:
    """Writes ``model.safetensors`` or, above ``max_shard_size``, ``model-0000i-of-0000n``
    shards with ``model.safetensors.index.json`` (Hugging Face's layout and names); returns the
    file names. Tensors are produced and written one at a time."""
    shards = _shards(tensors, parse_size(max_shard_size))
    for stale in _stale_files(directory):
        os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        write_file(os.path.join(directory, "model.safetensors"), shards[0])
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(os.path.join(directory, name), shard)
        weight_map.update({tensor.name: name for tensor in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return names


def _stale_files(directory: str) -> Iterator[str]:
    """Weights an earlier export left in ``directory`` (so a reader never mixes two)."""
    for name in os.listdir(directory):
        if name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors")):
            yield name
