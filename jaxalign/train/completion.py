"""Completion log-probs of a batch through the chunked LM head: the one path every step takes.

A batch either carries its head targets (a packed batch: ``target_source``, ``target_token``,
``target_group`` ``[rows, K]`` and a sequence layout ``positions``/``segment_ids``/
``branch_ids``) or they are derived from its ``completion_mask`` (a padded batch:
:func:`jaxalign.logprobs.targets_from_completion_mask`). Either way the trunk runs once, only
the target positions' hidden states reach the LM head (:func:`jaxalign.logprobs.logprobs_at`,
chunked, no ``[B, T, V]`` logits), and per-token log-probs are summed into groups
(sequences) with a static number of groups, so the step traces once per batch shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.logprobs import HeadTargets, group_sums, logprobs_at, targets_from_completion_mask
from jaxalign.models.layout import SequenceLayout

__all__ = ["GroupLogps", "batch_layout", "batch_targets", "completion_sums", "dropout_rngs",
           "group_logps", "target_logps"]

TARGET_KEYS = ("target_source", "target_token", "target_group")


class GroupLogps(NamedTuple):
    """Per-group completion log-prob sums and token counts, ``[G]`` float32 each."""

    sums: jax.Array
    counts: jax.Array


def batch_layout(batch: dict, prefix: str = "") -> Any:
    """The batch's :class:`~jaxalign.models.layout.SequenceLayout` when it is packed (it has
    ``segment_ids``), else ``None``."""
    if f"{prefix}segment_ids" not in batch:
        return None
    return SequenceLayout(*(jnp.asarray(batch[f"{prefix}{name}"], jnp.int32)
                            for name in ("positions", "segment_ids", "branch_ids")))


def batch_targets(batch: dict, tokens: jax.Array, completion_mask: jax.Array | None = None,
                  row_groups: jax.Array | None = None) -> HeadTargets:
    """The batch's own ``target_*`` arrays, or those derived from ``completion_mask``."""
    if all(key in batch for key in TARGET_KEYS):
        return HeadTargets(*(jnp.asarray(batch[key], jnp.int32) for key in TARGET_KEYS))
    if completion_mask is None:
        raise ValueError(f"the batch has neither {TARGET_KEYS} nor a completion_mask")
    return targets_from_completion_mask(tokens, completion_mask, row_groups=row_groups)


def target_logps(model: Any, params: Any, tokens: jax.Array, attention_mask: jax.Array | None,
                 targets: HeadTargets, *, layout: Any = None, logit_scale: float = 1.0,
                 with_entropy: bool = False, dropout_key: jax.Array | None = None,
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-target log-probs ``[rows, K]`` (0 on unused slots; and entropies with
    ``with_entropy``) from one trunk pass; the chunk size is ``model.config.logprob_chunk``.
    ``dropout_key``: the ``"dropout"`` rng of a training pass (LoRA dropout); none: the
    deterministic model (reference, evaluation)."""
    variables = {"params": params}
    kwargs = {} if layout is None else {"layout": layout}
    hidden = model.apply(variables, tokens, attention_mask, method="hidden",
                         rngs=dropout_rngs(dropout_key), **kwargs)
    head = model.apply(variables, method="head")
    return logprobs_at(hidden, head, targets.source, targets.token, targets.group >= 0,
                       chunk_size=model.config.logprob_chunk, logit_scale=logit_scale,
                       with_entropy=with_entropy)


def dropout_rngs(dropout_key: jax.Array | None) -> dict[str, jax.Array] | None:
    """``model.apply``'s ``rngs`` for a pass with ``dropout_key`` (none: no dropout)."""
    return None if dropout_key is None else {"dropout": dropout_key}


def group_logps(model: Any, params: Any, tokens: jax.Array, attention_mask: jax.Array | None,
                targets: HeadTargets, num_groups: int, *, layout: Any = None,
                dropout_key: jax.Array | None = None) -> GroupLogps:
    """Completion log-prob sums and token counts per group, ``[num_groups]`` each."""
    per_target = target_logps(model, params, tokens, attention_mask, targets, layout=layout,
                              dropout_key=dropout_key)
    counts = group_sums(jnp.ones_like(per_target), targets.group, num_groups)
    return GroupLogps(group_sums(per_target, targets.group, num_groups), counts)


def completion_sums(model: Any, params: Any, tokens: jax.Array, attention_mask: jax.Array,
                    completion_mask: jax.Array, *,
                    dropout_key: jax.Array | None = None) -> jax.Array:
    """``[B]`` completion log-prob sums ``Σ_t mask_t · log p(y_t | y_<t)`` of a padded batch
    (the chunked equivalent of :func:`jaxalign.sequence_logprobs` on the model's logits)."""
    targets = targets_from_completion_mask(tokens, completion_mask)
    return group_logps(model, params, tokens, attention_mask, targets, tokens.shape[0],
                       dropout_key=dropout_key).sums
