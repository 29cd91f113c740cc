"""Read and write Hugging Face checkpoints of today's decoder families (:data:`FAMILIES`:
Llama 1–3.3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3), as causal LMs or, from
``*ForSequenceClassification`` checkpoints, as reward models.

``load_hf(path)`` reads ``config.json`` and ``*.safetensors`` (one file, or the shards listed
in ``model.safetensors.index.json``) from a local directory, one tensor at a time, straight
into the requested ``param_dtype`` (rows are converted in chunks, so no tensor is ever held in
two dtypes at once); with a ``mesh`` each device receives only its shard of each parameter
(``jax.make_array_from_callback``). ``save_hf(model, params, path)`` writes the family and
``model_type`` the model came from (``config.family``), sharded above ``max_shard_size`` with
``model.safetensors.index.json``, plus ``config.json`` and ``generation_config.json``, so that
``transformers.AutoModelForCausalLM`` (or ``AutoModelForSequenceClassification``) loads it.
Only numpy, ``ml_dtypes`` and the safetensors format are used: no torch, no network.

The weight mapping is :func:`jaxalign.models.hf_weights.weight_table`; the config mapping is
:mod:`jaxalign.models.hf_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.models.config import TransformerConfig
from jaxalign.models.heads import CausalLM, RewardModel, logical_axes
from jaxalign.models.hf_config import FAMILIES, config_from_hf, config_to_hf
from jaxalign.models.hf_weights import IGNORED_SUFFIXES, HFTensor, Part, weight_table
from jaxalign.models.safetensors_io import (TensorInfo, TensorWrite, checkpoint_tensors,
                                            read_rows, write_checkpoint)
from jaxalign.models.transformer import stack_layer_params

__all__ = ["FAMILIES", "load_hf", "read_hf_config", "save_hf"]

_CHUNK_ELEMENTS = 1 << 20  # rows are read and converted ~1M elements at a time
_ALIGNMENT = 64  # bytes: JAX's CPU client adopts a buffer this aligned instead of copying it


def read_hf_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a local checkpoint directory."""
    with open(os.path.join(os.fspath(path), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _is_classifier(hf: dict) -> bool:
    return any(arch.endswith("ForSequenceClassification")
               for arch in hf.get("architectures") or [])


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary, so ``jax.device_put`` on CPU takes the buffer over
    (zero copy) instead of holding the tensor twice."""
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(size + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def _read_part(info: TensorInfo, part: Part, dtype: np.dtype) -> np.ndarray:
    """The parameter of ``part`` from its rows of the stored tensor, converted to ``dtype``
    chunk by chunk (``"linear"``: ``[out, in]`` rows transposed into ``[in, out]``)."""
    rows = part.stop - part.start
    row_size = int(np.prod(info.shape[1:], dtype=np.int64))
    step = max(1, _CHUNK_ELEMENTS // max(row_size, 1))
    if part.kind == "linear":
        out = _aligned_empty((row_size, rows), dtype)
    else:
        out = _aligned_empty((rows, *info.shape[1:]), dtype)
    for begin in range(0, rows, step):
        end = min(begin + step, rows)
        chunk = read_rows(info, part.start + begin, part.start + end)
        if part.kind == "linear":
            out[:, begin:end] = chunk.T
        else:
            out[begin:end] = chunk
        del chunk
    return out.reshape(part.shape)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` without the mesh axes that do not divide the dimension they would split."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for axes, dim in zip(entries, shape):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def _spec_at(specs: Any, path: tuple[str, ...]) -> PartitionSpec:
    for key in path:
        specs = specs[key]
    return specs


def _placer(model: nn.Module, mesh: Mesh | None, rules: Sequence | None):
    """``place(path, host_array) -> jax.Array``: onto the default device or, with a mesh, as
    shards (each device gets only its block; the logical axes of the unrolled layout)."""
    if mesh is None:
        return lambda path, array: jax.device_put(array)
    if rules is None:
        raise ValueError("load_hf(mesh=...) needs rules (e.g. jaxalign.sharding.DEFAULT_RULES)")
    unrolled = model.clone(config=dataclasses.replace(model.config, scan_layers=False))
    specs = nn.logical_to_mesh(logical_axes(unrolled), rules)

    def place(path, array):
        sharding = NamedSharding(mesh, _fit(_spec_at(specs, path), array.shape, mesh))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place


def _check_tensors(table: list[HFTensor], stored: dict[str, TensorInfo], path: str) -> None:
    expected = {tensor.name: tensor for tensor in table}
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing weight {missing[0]!r}"
                         f" ({len(missing)} missing)")
    unused = sorted(name for name in stored if name not in expected
                    and not name.endswith(IGNORED_SUFFIXES) and name != "lm_head.weight")
    if unused:
        raise ValueError(f"{path}: checkpoint has weights this model does not use:"
                         f" {unused[:8]}")
    for name, tensor in expected.items():
        if tuple(stored[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: weight {name!r} has shape {stored[name].shape}, the"
                             f" config implies {tensor.shape}")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Sequence | None = None,
    **config_overrides: Any,
) -> tuple[CausalLM | RewardModel, Any]:
    """Load a local HF checkpoint directory as a :class:`CausalLM` (or, for a
    ``*ForSequenceClassification`` checkpoint, a :class:`RewardModel`) and its params.

    Args:
      path: directory with ``config.json`` and ``*.safetensors``.
      dtype: compute dtype of the returned model.
      param_dtype: dtype every parameter is read into (tensor by tensor).
      mesh: place each parameter sharded over this mesh (each device receives only its
        shard), laid out by the model's logical axis names and ``rules``.
      rules: logical-axis -> mesh-axis table, e.g. ``jaxalign.sharding.DEFAULT_RULES``.
      **config_overrides: other :class:`TransformerConfig` fields (``remat``, ``scan_layers``,
        ``max_len``, ...).

    Returns:
      ``(model, params)``, params unboxed: ``model.apply({"params": params}, tokens, mask)``.
      A reward model's score head reads the last real token (as HF's does the last non-pad
      one) and has no bias in HF: its ``bias`` is 0.

    Raises:
      ValueError: unsupported architecture or feature (the config key and value named), or
        missing, unexpected or misshapen weights.
    """
    path = os.fspath(path)
    hf = read_hf_config(path)
    reward = _is_classifier(hf)
    if reward and len(hf.get("id2label") or {"0": None}) != 1:
        raise ValueError(f"{path}: a reward model has one score, but the checkpoint has"
                         f" {len(hf['id2label'])} labels (id2label)")
    config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    model = (RewardModel if reward else CausalLM)(config)
    table = weight_table(config, "score" if reward else "lm")
    stored = checkpoint_tensors(path)
    _check_tensors(table, stored, path)
    place = _placer(model, mesh, rules)
    target = np.dtype(config.param_dtype)
    params: dict = {}
    for tensor in table:
        for part in tensor.parts:
            _set(params, part.path, place(part.path, _read_part(stored[tensor.name], part,
                                                                 target)))
    if reward:
        _set(params, ("score_head", "bias"), place(("score_head", "bias"),
                                                   np.zeros((), target)))
    if config.scan_layers:  # stacked after loading: the layers are held twice meanwhile
        params = stack_layer_params(params, config.n_layers)
        if mesh is not None:
            specs = nn.logical_to_mesh(logical_axes(model), rules)
            params = jax.tree.map(lambda spec, leaf: jax.device_put(
                leaf, NamedSharding(mesh, _fit(spec, leaf.shape, mesh))), specs, params,
                is_leaf=lambda x: isinstance(x, PartitionSpec))
    return model, params


def _getter(params: Any, n_layers: int):
    """``get(path) -> host array`` for unrolled paths, also from scanned (stacked) params."""
    trunk = params["trunk"]

    def get(path: tuple[str, ...]) -> np.ndarray:
        node, layer = params, None
        if path[0] == "trunk" and path[1].startswith("layers_") and "layers" in trunk:
            node, layer, path = trunk["layers"], int(path[1].removeprefix("layers_")), path[2:]
        for key in path:
            node = node[key]
        return np.asarray(jax.device_get(node if layer is None else node[layer]))

    return get


def _hf_tensor(tensor: HFTensor, get, dtype: np.dtype) -> np.ndarray:
    """An HF tensor from its parts: kernels transposed back to ``[out, in]``, rows joined."""
    rows = []
    for part in tensor.parts:
        value = get(part.path).astype(dtype)
        if part.kind == "linear":
            value = value.reshape(-1, part.stop - part.start).T
        rows.append(value.reshape((part.stop - part.start, *tensor.shape[1:])))
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


def save_hf(
    model: CausalLM | RewardModel,
    params: Any,
    path: str | os.PathLike,
    *,
    extra_config: dict | None = None,
    generation_config: dict | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write a checkpoint ``transformers`` loads: the model's family (``config.family``),
    ``*.safetensors`` in ``param_dtype`` (sharded above ``max_shard_size``, with
    ``model.safetensors.index.json``), ``config.json`` and, for a causal LM,
    ``generation_config.json``. Tensors are fetched and written one at a time.

    Args:
      model: a :class:`CausalLM` (or subclass; a value head is not exported) or a
        :class:`RewardModel` (written as ``*ForSequenceClassification`` with one label).
      params: its unboxed parameters (scanned or unrolled layout).
      path: output directory (created if needed).
      extra_config: more ``config.json`` entries, e.g. ``{"eos_token_id": 2}``.
      generation_config: ``generation_config.json`` (default: the ``bos_token_id``,
        ``eos_token_id`` and ``pad_token_id`` of ``extra_config``, as transformers derives it).
      max_shard_size: bytes per file, an int or ``"5GB"``-style (powers of 1000).

    Raises:
      ValueError: the family cannot express the config, or a reward model's score bias is not
        0 (HF's score layer has no bias: the rewards would shift).
    """
    config: TransformerConfig = model.config
    reward = isinstance(model, RewardModel)
    if not reward and not isinstance(model, CausalLM):
        raise TypeError(f"save_hf writes causal LMs and reward models, not"
                        f" {type(model).__name__}")
    path = os.fspath(path)
    dtype = np.dtype(config.param_dtype)
    hf = config_to_hf(config, "bfloat16" if dtype == jnp.bfloat16 else dtype.name,
                      reward=reward)
    hf.update(extra_config or {})
    if reward:
        bias = float(np.asarray(jax.device_get(params["score_head"]["bias"])))
        if bias != 0.0:
            raise ValueError(f"score_head.bias={bias}: HF's score layer has no bias, so the"
                             " exported rewards would shift by it")
    os.makedirs(path, exist_ok=True)
    get = _getter(params, config.n_layers)
    table = weight_table(config, "score" if reward else "lm")
    write_checkpoint(path, [TensorWrite(t.name, dtype, t.shape,
                                        lambda t=t: _hf_tensor(t, get, dtype)) for t in table],
                     max_shard_size=max_shard_size)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    if not reward:
        if generation_config is None:
            generation_config = {k: hf[k] for k in ("bos_token_id", "eos_token_id",
                                                    "pad_token_id") if hf.get(k) is not None}
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config, f, indent=2)
