"""Models built on the :class:`~jaxalign.models.transformer.Transformer` trunk.

Every model is called as ``model.apply({"params": params}, tokens, attention_mask)`` with
``tokens [B, T]`` int32 and an optional ``attention_mask [B, T]`` (default all ones):

* :class:`CausalLM` -> ``logits [B, T, V]`` float32 (``logits[:, t]`` predicts token ``t + 1``).
* :class:`ValueModel` -> ``values [B, T]`` float32, one scalar per token.
* :class:`RewardModel` -> ``rewards [B]`` float32 from the hidden state of each row's last
  non-padding token (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155).
* :class:`CausalLMWithValueHead` -> ``(logits [B, T, V], values [B, T])`` from one shared trunk.

``CausalLM`` and ``CausalLMWithValueHead`` also take ``cache=`` (a :class:`KVCache` from
:func:`~jaxalign.models.transformer.init_cache`) and then return the updated cache last; their
``decode`` method (``apply(..., cache, method="decode")``) returns ``(logits [B, V] of the
last position, cache)``, the step the sampler runs. ``apply(..., method="hidden")`` returns the
trunk's hidden states ``[B, T, D]`` (no head; ``layout=`` for packed rows) and
``apply(..., method="head")`` the head's weight as a :class:`~jaxalign.logprobs.HeadWeight`, which
is how the training steps compute log-probs at completion positions only, chunked
(:func:`jaxalign.logprobs.logprobs_at`), without ``[B, T, V]`` logits.

Parameter trees: ``{"trunk": ..., "lm_head": {"kernel": [D, V]}}`` (no ``lm_head`` with tied
embeddings), ``{"trunk": ..., "value_head": ...}``, ``{"trunk": ..., "score_head": ...}``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.logprobs import HeadWeight
from jaxalign.models.attention import soft_cap
from jaxalign.models.config import TransformerConfig
from jaxalign.models.layers import logical_param
from jaxalign.models.lora_layer import freeze
from jaxalign.models.transformer import KVCache, Transformer


def _trunk(trunk: Transformer, tokens, attention_mask, cache, layout):
    """``trunk(tokens, attention_mask, cache)``, with ``layout=`` only when one is given."""
    if layout is None:
        return trunk(tokens, attention_mask, cache)
    return trunk(tokens, attention_mask, cache, layout=layout)


class LMHead(nn.Module):
    """Untied output projection ``hidden [B, T, D] -> logits [B, T, V]`` in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = logical_param(self, "kernel", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                               cfg)
        return jnp.einsum("btd,dv->btv", hidden.astype(cfg.dtype), kernel.astype(cfg.dtype),
                          preferred_element_type=jnp.float32)


class ScalarHead(nn.Module):
    """Linear map ``hidden [..., D] -> [...]`` computed in float32 (value or reward head)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = logical_param(self, "kernel", (cfg.d_model,), ("embed",), cfg)
        bias = logical_param(self, "bias", (), (), cfg, nn.initializers.zeros_init())
        hidden = hidden.astype(jnp.float32)
        return jnp.einsum("...d,d->...", hidden, kernel.astype(jnp.float32)) + bias.astype(
            jnp.float32
        )


class CausalLM(nn.Module):
    """Decoder with a language-model head.

    ``apply(variables, tokens [B, T], attention_mask [B, T] = None) -> logits [B, T, V]``
    float32; with ``cache=KVCache`` it returns ``(logits, cache)``: the new tokens are written
    at ``cache.index`` and attend to every earlier real token in the cache.
    ``apply(..., cache=cache, method="decode")`` returns only the last position's logits.
    """

    config: TransformerConfig

    def setup(self):
        self.trunk = Transformer(self.config)
        if not self.config.tie_embeddings:
            self.lm_head = LMHead(self.config)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [B, T, D] -> logits [B, T, V]`` float32 (soft-capped with
        ``config.final_logit_softcap``, as Gemma 2 does)."""
        if self.config.tie_embeddings:
            logits = self.trunk.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return soft_cap(logits, self.config.final_logit_softcap)

    def head(self) -> HeadWeight:
        """The LM head as the chunked log-probs read it (``apply(..., method="head")``): the
        kernel ``[D, V]``, or the tied embedding ``[V, D]``, in ``config.dtype``, and the
        final soft-cap."""
        cfg = self.config
        if cfg.tie_embeddings:
            weight, layout = self.trunk.embedding, "vd"
        else:
            # frozen under LoRA as the Projection's own kernel is: no ∂W of the head
            weight = freeze(self.lm_head, self.lm_head.variables["params"]["kernel"], cfg)
            layout = "dv"
        return HeadWeight(jnp.asarray(weight).astype(cfg.dtype), layout,
                          cfg.final_logit_softcap)

    def hidden(self, tokens, attention_mask=None, layout=None) -> jax.Array:
        """The trunk's final-norm hidden states ``[B, T, D]`` float32 (no LM head);
        ``apply(..., method="hidden")``. ``layout``: a packed batch's sequence layout."""
        return _trunk(self.trunk, tokens, attention_mask, None, layout)[0]

    def __call__(self, tokens, attention_mask=None, cache: KVCache | None = None, layout=None):
        hidden, new_cache = _trunk(self.trunk, tokens, attention_mask, cache, layout)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def decode(self, tokens, attention_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run ``tokens [B, T]`` through the cache; ``(logits [B, V] of position T − 1, cache)``.

        The sampler's step: with left-padded prompts the last position is every row's last
        real token, and the LM head runs on that position only.
        """
        hidden, new_cache = self.trunk(tokens, attention_mask, cache)
        return self.logits(hidden[:, -1:])[:, 0], new_cache


class ValueModel(nn.Module):
    """Decoder with a scalar head on every token: ``apply(...) -> values [B, T]`` float32."""

    config: TransformerConfig
    head_name = "value_head"

    def setup(self):
        self.trunk = Transformer(self.config)
        self.value_head = ScalarHead(self.config)

    def __call__(self, tokens, attention_mask=None) -> jax.Array:
        hidden, _ = self.trunk(tokens, attention_mask)
        return self.value_head(hidden)


def last_token_index(attention_mask: ArrayLike) -> jax.Array:
    """``[B]`` int32 index of each row's last non-padding token (0 for an all-padding row)."""
    mask = jnp.asarray(attention_mask)
    slots = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, slots[None, :], 0), axis=-1)


class RewardModel(nn.Module):
    """Decoder scored at each row's last real token: ``apply(...) -> rewards [B]`` float32.

    ``r = w · h_last + b`` where ``h_last`` is the final-norm hidden state of the last position
    with ``attention_mask == 1`` (works for left- or right-padded rows); what sits in padding
    positions never changes the reward.
    """

    config: TransformerConfig
    head_name = "score_head"

    def setup(self):
        self.trunk = Transformer(self.config)
        self.score_head = ScalarHead(self.config)

    def __call__(self, tokens, attention_mask=None) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        hidden, _ = self.trunk(tokens, attention_mask)
        last = last_token_index(attention_mask)
        last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.score_head(last_hidden)


class CausalLMWithValueHead(CausalLM):
    """Shared trunk, LM head and value head (PPO's actor-critic): a :class:`CausalLM` plus a
    ``value_head`` (its ``logits`` and ``decode`` are the causal LM's).

    ``apply(...) -> (logits [B, T, V], values [B, T])``, both float32; with ``cache=`` it
    returns ``(logits, values, cache)``. :func:`causal_lm_params` drops the value head again.
    """

    head_name = "value_head"

    def setup(self):
        super().setup()
        self.value_head = ScalarHead(self.config)

    def __call__(self, tokens, attention_mask=None, cache: KVCache | None = None, layout=None):
        hidden, new_cache = _trunk(self.trunk, tokens, attention_mask, cache, layout)
        logits = self.logits(hidden)
        values = self.value_head(hidden)
        return (logits, values) if cache is None else (logits, values, new_cache)


@functools.lru_cache(maxsize=32)
def _jitted_init(model: nn.Module):
    return jax.jit(model.init)


def init_params(model: nn.Module, key: jax.Array) -> Any:
    """Freshly initialised, unboxed parameters of ``model`` (for ``apply({"params": ...})``).

    The jitted ``model.init`` is cached per (hashable) model, so a second call compiles nothing.
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(_jitted_init(model)(key, dummy)["params"])


def logical_axes(model: nn.Module) -> Any:
    """A pytree like the params with a ``PartitionSpec`` of logical axis names per leaf."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy)
    return nn.get_partition_spec(boxed)["params"]


def init_head_from_causal_lm(model: nn.Module, lm_params: Any, key: jax.Array) -> Any:
    """Parameters for ``model`` that reuse a :class:`CausalLM`'s trunk (and LM head).

    The trunk (and, for :class:`CausalLMWithValueHead`, the LM head) is copied from
    ``lm_params``; the scalar head is freshly initialised from ``key``. This is how RLHF
    initialises the reward and value models from the SFT policy.

    Args:
      model: a :class:`ValueModel`, :class:`RewardModel` or :class:`CausalLMWithValueHead`.
      lm_params: unboxed parameters of a :class:`CausalLM` with the same config.
      key: PRNG key for the new head.

    Returns:
      Unboxed parameters for ``model.apply({"params": ...}, ...)``.
    """
    head_name = getattr(model, "head_name", None)
    if head_name is None:
        raise ValueError(f"model={type(model).__name__} has no scalar head to initialise")
    head = ScalarHead(model.config)
    head_params = jax.jit(head.init)(key, jnp.zeros((1, model.config.d_model), jnp.float32))
    head_params = head_params["params"]
    params = {"trunk": lm_params["trunk"], head_name: nn.meta.unbox(head_params)}
    if isinstance(model, CausalLMWithValueHead) and not model.config.tie_embeddings:
        params["lm_head"] = lm_params["lm_head"]
    return params


def causal_lm_params(params: Any) -> Any:
    """The :class:`CausalLM` parameters inside a model's: everything but a scalar head (the
    inverse of :func:`init_head_from_causal_lm` for :class:`CausalLMWithValueHead`)."""
    heads = {cls.head_name for cls in (ValueModel, RewardModel, CausalLMWithValueHead)}
    return {name: tree for name, tree in params.items() if name not in heads}


def value_params_from_reward_model(reward_params: Any) -> Any:
    """:class:`ValueModel` parameters that start from a :class:`RewardModel`'s (its trunk, and
    its score head as the per-token value head), as InstructGPT initialises the critic."""
    return {"trunk": reward_params["trunk"],
            ValueModel.head_name: reward_params[RewardModel.head_name]}
