"""LoRA adapters in PEFT's format, and merged Hugging Face exports.

:func:`save_peft_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(transformers_model, dir)`` loads onto the base model's
Hugging Face export; :func:`load_peft_adapter` reads such a directory back onto jaxalign
params to continue training (:func:`read_peft_adapter`: the adapters alone).
:func:`save_merged_hf` folds the adapters in and writes a plain checkpoint
(:func:`jaxalign.models.save_hf`).

Names and layouts (checked against PEFT 0.21's own save of a tiny Llama)::

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, d_in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [d_out, r]

jaxalign's ``lora_a [*in, r]`` is ``lora_A.weightᵀ`` reshaped, ``lora_b [r, *out]`` is
``lora_B.weightᵀ`` reshaped (HF linear weights are ``[out, in]``), exactly as the base kernels.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import numpy as np
from flax.traverse_util import unflatten_dict

from jaxalign.models.hf import _getter, save_hf
from jaxalign.models.hf_weights import weight_table
from jaxalign.models.heads import CausalLM
from jaxalign.models.lora import (adapter_params, add_adapters, base_params, merge_lora, with_lora,
                                  without_lora)
from jaxalign.models.lora_layer import PROJECTIONS, input_ndim
from jaxalign.models.safetensors_io import TensorWrite, file_tensors, read_rows, write_file
from jaxalign.models.transformer import stack_layer_params

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_peft_adapter", "read_peft_adapter",
           "save_merged_hf", "save_peft_adapter"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TARGET_OF = {module: target for target, module in PROJECTIONS.items()}


def _adapted_tensors(config, head: str) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``(peft name stem, kernel path, kernel shape)`` of every adapted projection."""
    if config.family == "phi3":
        raise ValueError("PEFT adapters of phi3's fused qkv_proj/gate_up_proj are not"
                         " supported")
    wanted = {PROJECTIONS[t] for t in config.lora_targets}
    found = []
    for tensor in weight_table(config, head):
        part = tensor.parts[0]
        if part.kind == "linear" and len(part.path) > 2 and part.path[-2] in wanted:
            found.append((_PREFIX + tensor.name.removesuffix(".weight"), part.path[:-1],
                          part.shape))
    return found


def _head(model: nn.Module) -> str:
    if not isinstance(model, CausalLM):
        raise TypeError(f"PEFT adapters are written for causal LMs, not {type(model).__name__}")
    return "lm"


def peft_config(config, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA model config."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
            "lora_alpha": config.lora_scale * config.lora_rank,
            "lora_dropout": config.lora_dropout, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(PROJECTIONS[t] for t in config.lora_targets),
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base_model_name_or_path}


def save_peft_adapter(model: nn.Module, params: Any, path: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> None:
    """Write ``model``'s adapters (float32) as a PEFT LoRA adapter directory ``path``."""
    config = model.config
    if not config.lora_rank:
        raise ValueError("save_peft_adapter needs a LoRA model (lora_rank > 0)")
    path = os.fspath(path)
    get = _getter(params, config.n_layers)
    writes = []
    for stem, module_path, shape in _adapted_tensors(config, _head(model)):
        n_in = input_ndim(module_path[-1])
        fan_in, fan_out, rank = math.prod(shape[:n_in]), math.prod(shape[n_in:]), config.lora_rank
        writes += [
            TensorWrite(f"{stem}.lora_A.weight", np.float32, (rank, fan_in),
                        lambda p=module_path, f=fan_in: get((*p, "lora_a")).reshape(f, -1).T),
            TensorWrite(f"{stem}.lora_B.weight", np.float32, (fan_out, rank),
                        lambda p=module_path, r=rank: get((*p, "lora_b")).reshape(r, -1).T)]
    os.makedirs(path, exist_ok=True)  # a base model's weights there stay as they are
    write_file(os.path.join(path, ADAPTER_WEIGHTS), writes)
    with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(peft_config(config, base_model_name_or_path), f, indent=2)


def _read_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        spec = json.load(f)
    unsupported = {k: spec.get(k) for k in ("use_dora", "use_rslora", "rank_pattern",
                                             "alpha_pattern", "layers_to_transform",
                                             "modules_to_save", "fan_in_fan_out") if spec.get(k)}
    if spec.get("peft_type") != "LORA" or spec.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}/{ADAPTER_CONFIG}: only plain LoRA adapters load (peft_type"
                         f" LORA, bias none); got peft_type={spec.get('peft_type')!r},"
                         f" bias={spec.get('bias')!r}, {unsupported}")
    modules = spec["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in _TARGET_OF]
    if unknown:
        raise ValueError(f"{path}/{ADAPTER_CONFIG}: target_modules {unknown} are not jaxalign"
                         f" projections ({', '.join(_TARGET_OF)})")
    spec["targets"] = [_TARGET_OF[m] for m in modules]
    return spec


def read_peft_adapter(model: nn.Module, path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(lora_model, adapters)``: the PEFT adapter at ``path`` for ``model`` (a base model or
    a LoRA one, whose own LoRA settings are replaced), as the ``lora_*`` leaves of a parameter
    tree in the layout ``model.config.scan_layers`` gives (stacked or one per layer); the
    rank, alpha, dropout and targets come from its ``adapter_config.json``.

    Raises:
      ValueError: an unsupported adapter (DoRA, rsLoRA, per-module ranks, ...), or a missing,
        unexpected or misshapen tensor (named).
    """
    path = os.fspath(path)
    spec = _read_config(path)
    lora_model = with_lora(without_lora(model), int(spec["r"]), alpha=float(spec["lora_alpha"]),
                           targets=spec["targets"],
                           dropout=float(spec.get("lora_dropout") or 0.0))
    config, stored = lora_model.config, file_tensors(os.path.join(path, ADAPTER_WEIGHTS))
    adapters, expected = {}, set()
    for stem, module_path, shape in _adapted_tensors(config, _head(model)):
        n_in = input_ndim(module_path[-1])
        for leaf, suffix, want, to_ours in (
                ("lora_a", "lora_A", (config.lora_rank, math.prod(shape[:n_in])),
                 lambda x, s=shape, n=n_in: x.T.reshape(*s[:n], -1)),
                ("lora_b", "lora_B", (math.prod(shape[n_in:]), config.lora_rank),
                 lambda x, s=shape, n=n_in: x.T.reshape(-1, *s[n:]))):
            name = f"{stem}.{suffix}.weight"
            expected.add(name)
            if name not in stored or tuple(stored[name].shape) != want:
                got = stored[name].shape if name in stored else "missing"
                raise ValueError(f"{path}: tensor {name} should be {want}, got {got}")
            adapters[(*module_path, leaf)] = to_ours(read_rows(stored[name]).astype(np.float32))
    unexpected = sorted(set(stored) - expected)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:3]} (the model config does"
                         " not have these layers or projections)")
    adapters = unflatten_dict(adapters)
    if config.scan_layers:
        adapters = stack_layer_params(adapters, config.n_layers)
    return lora_model, adapters


def load_peft_adapter(model: nn.Module, params: Any,
                      path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(lora_model, params + adapters)``: :func:`read_peft_adapter`'s adapters on
    ``model``'s base ``params`` (any adapters already there are replaced)."""
    lora_model, adapters = read_peft_adapter(model, path)
    return lora_model, add_adapters(base_params(params), adapters)


def save_merged_hf(model: nn.Module, params: Any, path: str | os.PathLike, **options: Any):
    """:func:`jaxalign.models.save_hf` of the merged model (adapters folded into the kernels);
    a model without adapters is written as it is."""
    if model.config.lora_rank:
        if adapter_params(params):
            params = merge_lora(params, model.config)
        model = without_lora(model)
    return save_hf(model, params, path, **options)
