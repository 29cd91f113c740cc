"""LoRA as transformations of a parameter tree (Hu et al. 2021, arXiv:2106.09685).

A LoRA model is the same model with ``config.lora_rank > 0`` (:func:`with_lora`); its
parameter tree is the base tree plus ``lora_a [*in, r]`` / ``lora_b [r, *out]`` leaves next to
the ``kernel`` of every targeted projection (:mod:`jaxalign.models.lora_layer` runs them).
Everything here is a pure function of trees:

* :func:`init_lora`: base params -> base params + fresh adapters (``B = 0``: the same model).
* :func:`base_params`: the tree without its adapters, i.e. the base model with the adapters
  switched off (the reference model of DPO/PPO; no array is copied).
* :func:`merge_lora` / :func:`unmerge_lora`: ``W <- W ± (alpha / r) · A @ B``.
* :func:`trainable_mask`: which leaves train (adapters, and value/score heads).

The ``scale = alpha / r`` lives in the model config, not in the tree, exactly as PEFT keeps
``lora_alpha`` in ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxalign.models.config import LORA_TARGETS, TransformerConfig, check_lora_settings
from jaxalign.models.lora_layer import (ADAPTER_NAMES, PROJECTIONS, TRAINABLE_HEADS, input_ndim,
                                        merged_kernel)
from jaxalign.models.transformer import stack_layer_params, unstack_layer_params
from jaxalign.settings import setting

__all__ = ["LoraConfig", "add_adapters", "adapter_params", "base_params", "has_adapters", "init_lora", "is_lora",
           "lora_parameter_count", "merge_lora", "parse_lora_targets", "reference_params",
           "trainable_mask", "unmerge_lora", "with_lora", "without_lora"]


def parse_lora_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"q,k,v,o"`` (or a sequence) -> ``("q", "k", "v", "o")``; ``"all-linear"`` is every
    projection of :data:`LORA_TARGETS` (as PEFT's ``all-linear``, the LM head excluded)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all-linear"]:
        return LORA_TARGETS
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets={spec!r}: choose from {', '.join(LORA_TARGETS)} or"
                         " all-linear")
    return tuple(n for n in LORA_TARGETS if n in names)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The LoRA settings a training command exposes (``--lora-rank``, ...); rank 0 trains every
    parameter. Defaults as PEFT/TRL users expect: alpha ``2 · r``, every linear projection of
    the blocks (PEFT's ``all-linear``: attention and MLP, not the LM head)."""

    lora_rank: int = setting(0, "LoRA rank r: train rank-r adapters with the base weights"
                             " frozen (0: train every parameter)")
    lora_alpha: float | None = setting(None, "LoRA alpha: the update is (alpha / r) x A B"
                                       " (none: 2 r)")
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, "projections that get adapters,"
                                            " from q,k,v,o,gate,up,down, or all-linear")
    lora_dropout: float | None = setting(None, "LoRA dropout on the adapters' input while"
                                         " training, as PEFT's lora_dropout (none: 0, or a"
                                         " --lora-adapter's own)")
    lora_adapter: str | None = setting(None, "start the adapters from a PEFT adapter"
                                       " directory (adapter_config.json and"
                                       " adapter_model.safetensors; its rank, alpha and"
                                       " targets are used)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
        check_lora_settings(self.lora_rank, self.lora_alpha,
                            0.0 if self.lora_dropout is None else self.lora_dropout)

    @property
    def enabled(self) -> bool:
        return bool(self.lora_rank) or self.lora_adapter is not None

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` with these adapters (itself when ``lora_rank`` is 0)."""
        if not self.lora_rank:
            return model
        return with_lora(model, self.lora_rank, alpha=self.lora_alpha,
                         targets=self.lora_targets, dropout=self.lora_dropout or 0.0)


def is_lora(model_or_config: Any) -> bool:
    """Whether a model (or its config) has LoRA adapters (``lora_rank > 0``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "lora_rank", 0))


def with_lora(model: nn.Module, rank: int, *, alpha: float | None = None,
              targets: str | Sequence[str] = LORA_TARGETS, dropout: float = 0.0) -> nn.Module:
    """``model`` with rank-``rank`` adapters on ``targets`` (``alpha`` default ``2 · rank``)."""
    if rank < 1:
        raise ValueError(f"lora rank must be at least 1, got {rank}")
    config = dataclasses.replace(model.config, lora_rank=rank, lora_alpha=alpha,
                                 lora_targets=parse_lora_targets(targets), lora_dropout=dropout)
    return model.clone(config=config)


def without_lora(model: nn.Module) -> nn.Module:
    """The base model: ``model`` with ``lora_rank = 0`` and the other LoRA fields at their
    defaults (what :func:`merge_lora`'s params and a Hugging Face export describe)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
                if f.name.startswith("lora_")}
    return model.clone(config=dataclasses.replace(model.config, **defaults))


def _leaves(params: Any, adapters: bool) -> Any:
    """The nested dict ``params`` with only its adapter leaves (or only the others); the
    dicts left empty are dropped."""
    flat = flatten_dict(params)
    return unflatten_dict({path: leaf for path, leaf in flat.items()
                           if (path[-1] in ADAPTER_NAMES) == adapters})


def adapter_params(params: Any) -> Any:
    """Only the ``lora_a`` / ``lora_b`` leaves of ``params`` (the same nesting)."""
    return _leaves(params, adapters=True)


def base_params(params: Any) -> Any:
    """``params`` without adapters: the base model, adapters off (no array is copied)."""
    return _leaves(params, adapters=False)


def add_adapters(params: Any, adapters: Any) -> Any:
    """``params`` with the leaves of ``adapters`` (same nesting) added or replaced."""
    return unflatten_dict({**flatten_dict(params), **flatten_dict(adapters)})


def trainable_mask(params: Any) -> Any:
    """A bool tree like ``params``: ``True`` on adapters and on value/score-head leaves."""
    def trainable(path, _):
        names = [str(getattr(key, "key", key)) for key in path]
        return names[-1] in ADAPTER_NAMES or any(n in TRAINABLE_HEADS for n in names)
    return jax.tree_util.tree_map_with_path(trainable, params)


def lora_parameter_count(params: Any) -> int:
    """Number of adapter parameters in ``params``."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(adapter_params(params)))


def init_lora(model: nn.Module, params: Any, key: jax.Array) -> Any:
    """``params`` (a base model's tree) plus fresh adapters for the LoRA ``model``: ``A``
    Kaiming-uniform as PEFT, ``B = 0``, so the result computes exactly the base model.

    Only the adapters are initialised (the base init that ``model.init`` traces is dead code
    under ``jit``). Existing adapters in ``params`` are replaced.
    """
    if not is_lora(model):
        raise ValueError("init_lora needs a LoRA model (with_lora(model, rank))")
    dummy = jnp.zeros((1, 1), jnp.int32)

    def fresh(key):
        return adapter_params(nn.meta.unbox(model.init(key, dummy)["params"]))

    adapters = jax.jit(fresh)(key)
    n_layers = model.config.n_layers
    scanned = "layers" in params.get("trunk", {})
    adapters = (stack_layer_params if scanned else unstack_layer_params)(adapters, n_layers)
    return add_adapters(base_params(params), adapters)


def _deltas(params: Any, config: TransformerConfig, sign: float) -> Any:
    """Every adapted projection's ``kernel ± scale · A @ B`` (:func:`merged_kernel`), its
    ``lora_*`` leaves dropped."""
    flat = flatten_dict(params)
    for path in [p for p in flat if p[-1] == "lora_a"]:
        module = path[:-1]
        a, b = flat.pop(path), flat.pop((*module, "lora_b"))
        flat[(*module, "kernel")] = merged_kernel(flat[(*module, "kernel")], a, b,
                                                  sign * config.lora_scale,
                                                  input_ndim(str(module[-1])))
    return unflatten_dict(flat)


def merge_lora(params: Any, config: TransformerConfig) -> Any:
    """The base tree with every adapter folded in, ``W ← W + (alpha / r) · A @ B``, and the
    ``lora_*`` leaves dropped: the parameters of :func:`without_lora`'s model."""
    if not config.lora_rank:
        raise ValueError("merge_lora needs the LoRA model's config (lora_rank > 0)")
    if any(name not in PROJECTIONS.values() for name in _adapted_names(params)):
        raise ValueError("params hold adapters on modules that are not projections")
    return _deltas(params, config, 1.0)


def unmerge_lora(merged: Any, adapters: Any, config: TransformerConfig) -> Any:
    """Inverse of :func:`merge_lora` (up to rounding): ``W ← W − (alpha / r) · A @ B`` with
    ``adapters`` (:func:`adapter_params` of the unmerged tree) attached again."""
    unmerged = _deltas(add_adapters(merged, adapters), config, -1.0)
    return add_adapters(unmerged, adapters)


def _adapted_names(params: Any) -> set[str]:
    return {str(path[-2]) for path in flatten_dict(params) if path[-1] == "lora_a"}


def has_adapters(params: Any) -> bool:
    """Whether ``params`` holds any ``lora_*`` leaf (a static property of the tree)."""
    return isinstance(params, dict) and bool(adapter_params(params))  # empty dicts dropped


def reference_params(ref_params: Any, params: Any) -> Any:
    """The reference model's parameters: ``ref_params`` when a step keeps them, else, for a
    LoRA tree, the same tree with the adapters off (:func:`base_params`; no second copy of
    the base weights), else ``None``."""
    if ref_params is not None or not has_adapters(params):
        return ref_params
    return base_params(params)
