"""Supervised fine-tuning step: masked next-token negative log-likelihood."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.logprobs import token_logprobs
from jaxalign.masking import masked_mean
from jaxalign.train.state import TrainState, make_loss_step


def sft_loss(
    model: Any, params: Any, batch: dict[str, jax.Array], *, include_prompt: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over completion tokens (every real token after the first if ``include_prompt``).

    The mean is over all counted tokens of the batch (TRL's convention), not per sequence.

    Args:
      model: a causal LM (``model.apply({"params": p}, ids, attention_mask) -> [B, T, V]``).
      params: its parameters.
      batch: ``input_ids``, ``attention_mask``, ``completion_mask``, each ``[B, T]``.
      include_prompt: train on prompt tokens too.

    Returns:
      ``(loss, metrics)`` with ``nll`` and ``tokens`` (number of counted tokens).
    """
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    logits = model.apply({"params": params}, ids, attention_mask)
    logps = token_logprobs(logits, ids)
    if include_prompt:
        # every real token except each row's first one, which nothing predicts
        first = jnp.cumsum(attention_mask, axis=-1) == 1
        mask = (attention_mask > 0) & ~first
    else:
        mask = batch["completion_mask"] > 0
    nll = -masked_mean(logps, mask)
    return nll, {"nll": nll, "tokens": jnp.sum(mask).astype(jnp.float32)}


def make_sft_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    include_prompt: bool = False,
    axis_name: str | None = None,
    jit: bool = True,
    mesh: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` for SFT, compiled once with the state donated.

    Metrics: ``loss``, ``nll``, ``tokens``, ``grad_norm``, ``skipped_updates``.
    """

    def loss_fn(params, state, batch):
        del state
        return sft_loss(model, params, batch, include_prompt=include_prompt)

    return make_loss_step(loss_fn, optimizer, axis_name=axis_name, jit=jit, mesh=mesh,
                          model=model)
