"""Supervised fine-tuning step: masked next-token negative log-likelihood."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.train.completion import batch_layout, batch_targets, target_logps
from jaxalign.train.state import TrainState, make_loss_step, train_dropout_key


def sft_loss(
    model: Any, params: Any, batch: dict[str, jax.Array], *, include_prompt: bool = False,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over completion tokens (every real token after the first if ``include_prompt``).

    The mean is over all counted tokens of the batch (TRL's convention), not per sequence.
    Only the counted tokens' hidden states reach the LM head, chunked
    (``model.config.logprob_chunk``): no ``[B, T, V]`` logits.

    Args:
      model: a causal LM (:class:`~jaxalign.models.CausalLM`).
      params: its parameters.
      batch: padded: ``input_ids``, ``attention_mask``, ``completion_mask``, each ``[B, T]``;
        packed: ``input_ids``, ``positions``, ``segment_ids``, ``branch_ids`` and
        ``target_source``/``target_token``/``target_group`` (the collator chose the counted
        tokens, so ``include_prompt`` does not apply).
      include_prompt: train on prompt tokens too (padded batches).
      dropout_key: the forward pass's ``"dropout"`` rng (LoRA dropout); none: deterministic.

    Returns:
      ``(loss, metrics)`` with ``nll`` and ``tokens`` (number of counted tokens).
    """
    ids = batch["input_ids"]
    layout = batch_layout(batch)
    if layout is not None:
        if include_prompt:
            raise ValueError("include_prompt applies to padded batches; a packed batch's"
                             " target_* arrays already say which tokens count")
        attention_mask, mask = None, None
    else:
        attention_mask = batch["attention_mask"]
        if include_prompt:
            # every real token except each row's first one, which nothing predicts
            first = jnp.cumsum(attention_mask, axis=-1) == 1
            mask = (attention_mask > 0) & ~first
        else:
            mask = batch["completion_mask"] > 0
    targets = batch_targets(batch, ids, mask)
    logps = target_logps(model, params, ids, attention_mask, targets, layout=layout,
                         dropout_key=dropout_key)
    counted = targets.group >= 0
    tokens = jnp.sum(counted).astype(jnp.float32)
    nll = -jnp.sum(jnp.where(counted, logps, 0.0)) / jnp.maximum(tokens, 1.0)
    return nll, {"nll": nll, "tokens": tokens}


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
        return sft_loss(model, params, batch, include_prompt=include_prompt,
                        dropout_key=train_dropout_key(state))

    return make_loss_step(loss_fn, optimizer, axis_name=axis_name, jit=jit, mesh=mesh,
                          model=model)
