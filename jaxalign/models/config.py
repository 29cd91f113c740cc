"""The one frozen configuration dataclass shared by every jaxalign model, and its presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _as_dtype(value: Any) -> np.dtype:
    return jnp.dtype(value)


REMAT_POLICIES = {  # TransformerConfig.remat_policy -> jax.checkpoint policy
    "nothing": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a Llama-style decoder.

    Attributes:
      vocab_size: number of token ids ``V``.
      d_model: residual width ``D``.
      n_layers: number of decoder blocks.
      n_heads: query heads ``H``.
      n_kv_heads: key/value heads ``Hkv`` (grouped-query attention; ``H % Hkv == 0``).
      d_ff: hidden width of the SwiGLU MLP.
      head_dim: per-head width ``Dh``; ``None`` means ``d_model // n_heads``.
      rope_theta: rotary-embedding base.
      norm_eps: RMSNorm epsilon.
      max_len: longest sequence (prompt + completion) the model is used with.
      tie_embeddings: reuse the token embedding as the output projection.
      qkv_bias: biases on the q/k/v projections (Qwen2).
      param_dtype: dtype parameters are created in (``float32`` recommended).
      dtype: compute dtype (``float32`` or ``bfloat16``): every matmul takes its inputs in it
        and accumulates in float32; the residual stream, norms, rotary embeddings and softmax
        stay float32, and so do logits, values and rewards. (On CPU this beats keeping
        activations in bfloat16: XLA computes bfloat16 elementwise ops in float32 anyway, so
        bfloat16 activations only add conversions.)
      remat: recompute each block's activations in the backward pass (``nn.remat``).
      remat_policy: what a rematerialised block keeps from its forward pass: ``"nothing"``
        (recompute everything: least memory, one more forward pass of compute) or ``"dots"``
        (keep the matmul outputs, recompute only the elementwise ops in between: norms,
        SwiGLU, softmax, rotary embeddings).
      scan_layers: run the blocks with ``nn.scan`` (one traced block, parameters stacked on a
        leading ``"layers"`` axis) instead of unrolling them (``layers_0``, ``layers_1``, ...).
        Off by default: on the 4-layer ``bench`` model, unrolled blocks compiled a
        forward+backward step faster (1.0 s vs 1.7 s) and ran it 17% faster on a 2-core CPU
        (scan slices every stacked weight per step). Turn it on for deep models, where one
        traced block keeps compile time flat.
      initializer_range: standard deviation of the normal weight initialiser.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 172
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_len: int = 256
    tie_embeddings: bool = False
    qkv_bias: bool = False
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing"
    scan_layers: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype))
        object.__setattr__(self, "dtype", _as_dtype(self.dtype))
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be 'nothing' or 'dots', got {self.remat_policy!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(
                f"head_dim={self.resolved_head_dim} must be even for rotary embeddings"
            )

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width ``Dh``: ``head_dim`` if set, else ``d_model // n_heads``."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, ``G = H / Hkv``."""
        return self.n_heads // self.n_kv_heads


PRESETS: dict[str, TransformerConfig] = {
    # Unit tests: compiles in a second or two.
    "tiny": TransformerConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=172, max_len=256
    ),
    # CPU demos: a few minutes of training on two cores.
    "small": TransformerConfig(
        vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=344, max_len=512
    ),
    # Every benchmark in benchmarks/ uses this one.
    "bench": TransformerConfig(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688,
        max_len=512, tie_embeddings=False,
    ),
}


def get_config(name: str, **overrides: Any) -> TransformerConfig:
    """``PRESETS[name]`` with ``overrides`` applied via ``dataclasses.replace``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset name={name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
