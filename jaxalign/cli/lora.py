"""``--lora-rank``/``--lora-adapter`` on a command's model source, and the LoRA run's pieces:
the optimiser that trains only the adapters and the checks a LoRA run makes up front."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxalign.cli.loop import RunError
from jaxalign.cli.options import ConfigError
from jaxalign.models import CausalLM, lora
from jaxalign.models.lora_peft import read_peft_adapter
from jaxalign.train.lora import lora_optimizer

__all__ = ["lora_source", "optimizer_for"]


@functools.lru_cache(maxsize=8)
def _init_fn(lora_model: Any) -> Callable:
    def init(make_params, lora_key, key):
        return lora.init_lora(lora_model, make_params(key), lora_key)
    return init


def _attach(make_params, adapters, key):
    return lora.add_adapters(make_params(key), adapters)


def check_export_adapter(model: Any, export_adapter: bool, source: str) -> None:
    """Refuses ``--export-adapter`` before training when there is nothing it could write: no
    adapters, or a model PEFT's format has no place for (a reward model's score head)."""
    if not export_adapter:
        return
    if not lora.is_lora(model):
        raise ConfigError("--export-adapter writes LoRA adapters: give --lora-rank or"
                          f" --lora-adapter (or {source})")
    if not isinstance(model, CausalLM):
        raise ConfigError("--export-adapter writes a causal LM's adapters in PEFT's format,"
                          f" which has no {type(model).__name__}: leave it out (the run's"
                          " checkpoints hold the adapters)")


def lora_source(model: Any, make_params: Callable, config: lora.LoraConfig, *, seed: int,
                flag: str) -> tuple[Any, Callable]:
    """``(model, key -> params)`` with the adapters of ``config``: fresh ones (``B = 0``, from
    ``seed``) at ``--lora-rank``, or a PEFT adapter's (``--lora-adapter``); unchanged when
    neither is given (a source that already has adapters keeps training them)."""
    if not config.enabled:
        return model, make_params
    if lora.is_lora(model):
        raise RunError(f"{flag} already has LoRA adapters (rank {model.config.lora_rank}):"
                       " leave out --lora-rank/--lora-adapter to keep training them")
    if config.lora_adapter is not None:
        try:
            lora_model, adapters = read_peft_adapter(model, config.lora_adapter)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunError(f"--lora-adapter {config.lora_adapter}: {error}") from None
        if config.lora_dropout is not None:  # --lora-dropout overrides the adapter's own
            lora_model = lora_model.clone(config=dataclasses.replace(
                lora_model.config, lora_dropout=config.lora_dropout))
        return lora_model, jax.tree_util.Partial(_attach, make_params, adapters)
    lora_model = config.apply(model)
    lora_key = jax.random.fold_in(jax.random.key(seed), 0x10DA)
    return lora_model, jax.tree_util.Partial(_init_fn(lora_model), make_params, lora_key)


def optimizer_for(model: Any, optimizer: Any) -> Any:
    """``optimizer`` on the adapters alone for a LoRA ``model`` (no state for the base)."""
    return lora_optimizer(optimizer) if lora.is_lora(model) else optimizer
