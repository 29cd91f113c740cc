"""Stateless ``flax.linen`` models: a Llama-style trunk with the switches of today's families,
its heads, and Hugging Face interop."""

from jaxalign.models.config import PRESETS, ComputeConfig, TransformerConfig, get_config
from jaxalign.models.heads import (
    CausalLM,
    CausalLMWithValueHead,
    RewardModel,
    ValueModel,
    causal_lm_params,
    init_head_from_causal_lm,
    init_params,
    last_token_index,
    logical_axes,
    value_params_from_reward_model,
)
from jaxalign.models.hf import FAMILIES, load_hf, read_hf_config, save_hf
from jaxalign.models.transformer import (
    LOGICAL_AXIS_NAMES,
    KVCache,
    SequenceLayout,
    Transformer,
    init_cache,
    positions_from_mask,
    stack_layer_params,
    unstack_layer_params,
)

__all__ = [
    "FAMILIES",
    "LOGICAL_AXIS_NAMES",
    "PRESETS",
    "CausalLM",
    "CausalLMWithValueHead",
    "ComputeConfig",
    "KVCache",
    "RewardModel",
    "SequenceLayout",
    "Transformer",
    "TransformerConfig",
    "ValueModel",
    "get_config",
    "init_cache",
    "causal_lm_params",
    "init_head_from_causal_lm",
    "init_params",
    "last_token_index",
    "load_hf",
    "logical_axes",
    "positions_from_mask",
    "read_hf_config",
    "save_hf",
    "stack_layer_params",
    "unstack_layer_params",
    "value_params_from_reward_model",
]
