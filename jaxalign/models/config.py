"""The one frozen configuration dataclass shared by every jaxalign model, and its presets.

:class:`TransformerConfig` describes a Llama-style decoder plus the explicit switches the
Hugging Face families need (biases, q/k norms, Gemma's sandwich norms and soft-capping,
sliding-window layers, rope scaling); every switch defaults to the original jaxalign model, so
the presets are unchanged. :class:`ComputeConfig` holds the precision and memory settings a
command line exposes (``--dtype``, ``--param-dtype``, ``--remat``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.chunked_logprobs import DEFAULT_LOGPROB_CHUNK
from jaxalign.settings import setting

__all__ = ["ACTIVATIONS", "ATTENTION_IMPLS", "FAMILY_SWITCHES", "LAYER_TYPES", "LORA_TARGETS",
           "PRESETS", "REMAT_POLICIES", "ROPE_TYPES", "ComputeConfig", "TransformerConfig",
           "check_lora_settings", "get_config"]


def _as_dtype(value: Any) -> np.dtype:
    return jnp.dtype(value)


REMAT_POLICIES = {  # TransformerConfig.remat_policy -> jax.checkpoint policy
    "nothing": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # the gate activation of the gated MLP
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")  # Hugging Face's rope_type names
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's layer_types names
ATTENTION_IMPLS = ("dense", "blockwise", "auto")  # TransformerConfig.attention_impl
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # projections that take adapters


def check_lora_settings(rank: int, alpha: float | None, dropout: float) -> None:
    """Raises naming the LoRA setting that is out of range (``TransformerConfig``'s and the
    training commands' ``LoraConfig``'s one check)."""
    if rank < 0:
        raise ValueError(f"lora_rank must be at least 0, got {rank}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a Llama-style decoder.

    Attributes:
      vocab_size: number of token ids ``V``.
      d_model: residual width ``D``.
      n_layers: number of decoder blocks.
      n_heads: query heads ``H``.
      n_kv_heads: key/value heads ``Hkv`` (grouped-query attention; ``H % Hkv == 0``).
      d_ff: hidden width of the gated MLP.
      head_dim: per-head width ``Dh``; ``None`` means ``d_model // n_heads``.
      rope_theta: rotary-embedding base.
      norm_eps: RMSNorm epsilon.
      max_len: longest sequence (prompt + completion) the model is used with.
      tie_embeddings: reuse the token embedding as the output projection.
      qkv_bias: biases on the q/k/v projections (Qwen2, Llama ``attention_bias``).
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
      logprob_chunk: tokens per chunk when a step computes log-probs from hidden states
        (:func:`jaxalign.token_logprobs_from_hidden`): the ``[chunk, V]`` logits are the largest
        array the LM head builds. Compute only: it changes no parameter and no result beyond
        float32 rounding.
      attention_impl: :data:`ATTENTION_IMPLS`: ``"dense"`` builds the ``[B, H, T, S]`` float32
        scores; ``"blockwise"`` runs an online softmax over key blocks
        (:mod:`jaxalign.models.blockwise`: memory linear in ``T``, forward and backward);
        ``"auto"`` uses cuDNN's fused attention on GPU where it applies, else blockwise from
        ``AUTO_BLOCKWISE_MIN_LENGTH`` slots up and dense below
        (:func:`jaxalign.models.attention.resolve_attention`). Compute only, like
        ``logprob_chunk``: results agree to float32 rounding.
      attention_block: queries and keys per block of the blockwise kernel.
      scan_layers: run the blocks with ``nn.scan`` (one traced block, parameters stacked on a
        leading ``"layers"`` axis) instead of unrolling them (``layers_0``, ``layers_1``, ...).
        Off by default: on the 4-layer ``bench`` model, unrolled blocks compiled a
        forward+backward step faster (1.0 s vs 1.7 s) and ran it 17% faster on a 2-core CPU
        (scan slices every stacked weight per step). Turn it on for deep models, where one
        traced block keeps compile time flat.
      initializer_range: standard deviation of the normal weight initialiser.

    Family switches (Hugging Face import sets them; the defaults are the Llama layout):
      o_bias: a bias on the attention output projection (Llama ``attention_bias``).
      mlp_bias: biases on gate/up/down (Llama ``mlp_bias``).
      qk_norm: RMSNorm over each head's queries and keys before the rotation (Qwen3, Gemma 3).
      post_norms: Gemma 2/3 "sandwich" norms: the attention and MLP outputs are normed again
        before each residual add (``post_attn_norm``, ``post_mlp_norm``).
      norm_scale_offset: every RMSNorm multiplies by ``offset + scale`` (Gemma: 1, its weights
        are stored around 0 and initialised at 0).
      mlp_activation: the gate activation: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` (GeGLU with
        the tanh approximation, Gemma's ``gelu_pytorch_tanh``) or ``"gelu"`` (exact erf).
      embed_scale: multiply the token embeddings by ``sqrt(d_model)`` (Gemma; the factor is
        rounded to ``param_dtype`` as Hugging Face does).
      query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar**-0.5``
        instead of ``head_dim**-0.5`` (Gemma).
      attn_logit_softcap: scores become ``c·tanh(scores / c)`` before masking (Gemma 2).
      final_logit_softcap: logits become ``c·tanh(logits / c)`` (Gemma 2).
      sliding_window: ``W``: a ``"sliding_attention"`` layer lets a token attend to itself and
        the ``W − 1`` tokens before it (Mistral, Gemma 2/3, Phi-3, Qwen ``use_sliding_window``),
        in training and in the KV-cache sampler alike.
      layer_types: one of :data:`LAYER_TYPES` per layer; ``None`` means every layer slides
        when ``sliding_window`` is set (Mistral, Phi-3), else every layer is global.
      local_rope_theta: rotary base of the sliding layers (Gemma 3's ``rope_local_base_freq``);
        ``None``: the same rotation as the global layers.
      rotary_dim: rotate only the first ``rotary_dim`` dims of each head (``partial_rotary_factor
        · head_dim``); ``None``: all of them.
      rope_type: :data:`ROPE_TYPES`: ``"linear"`` divides the frequencies by ``rope_factor``;
        ``"dynamic"`` is NTK scaling recomputed from each call's longest position (as
        Hugging Face does per forward); ``"llama3"`` is Llama 3.1's band-wise scaling.
      rope_factor, rope_low_freq_factor, rope_high_freq_factor: the scaling's parameters.
      rope_original_max_len: the pretraining context the scaling refers to (``llama3``: its
        ``original_max_position_embeddings``; ``dynamic``: ``max_position_embeddings``).
      family: the Hugging Face ``model_type`` the model exports as (``None``: ``qwen2`` with
        q/k/v biases, else ``llama``, as before).

    LoRA (Hu et al. 2021, arXiv:2106.09685; :mod:`jaxalign.models.lora`):
      lora_rank: ``r`` of the low-rank adapters ``A [d_in, r]``, ``B [r, d_out]`` on the
        ``lora_targets`` projections (0: no adapters). With adapters the base weights are
        frozen (their gradients are stopped) and only the adapters (and a value/score head)
        train.
      lora_alpha: the update is ``(alpha / r) · x A B``; ``None`` means ``2 · r``.
      lora_targets: the projections that get adapters (:data:`LORA_TARGETS` names).
      lora_dropout: dropout on the adapters' input (PEFT's ``lora_dropout``), applied when the
        forward pass is given a ``"dropout"`` rng.
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
    logprob_chunk: int = DEFAULT_LOGPROB_CHUNK
    attention_impl: str = "auto"
    attention_block: int = 128
    scan_layers: bool = False
    initializer_range: float = 0.02
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    norm_scale_offset: float = 0.0
    mlp_activation: str = "silu"
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    rotary_dim: int | None = None
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int | None = None
    family: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype))
        object.__setattr__(self, "dtype", _as_dtype(self.dtype))
        if self.layer_types is not None:  # a JSON list from a saved config: hashable again
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly"
            )
        if self.logprob_chunk < 1:
            raise ValueError(f"logprob_chunk must be at least 1, got {self.logprob_chunk}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got"
                             f" {self.attention_impl!r}")
        if self.attention_block < 1:
            raise ValueError(f"attention_block must be at least 1, got {self.attention_block}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be 'nothing' or 'dots', got {self.remat_policy!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.resolved_rotary_dim % 2 or self.resolved_rotary_dim > self.resolved_head_dim:
            raise ValueError(
                f"rotary_dim={self.resolved_rotary_dim} must be even and at most head_dim="
                f"{self.resolved_head_dim} for rotary embeddings"
            )
        self._check_switches()

    def _check_switches(self) -> None:
        self._check_lora()
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {ACTIVATIONS}, got "
                             f"{self.mlp_activation!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_type in ("dynamic", "llama3") and self.rope_original_max_len is None:
            raise ValueError(f"rope_type={self.rope_type!r} needs rope_original_max_len")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(
                    LAYER_TYPES):
                raise ValueError(f"layer_types must list one of {LAYER_TYPES} for each of the"
                                 f" {self.n_layers} layers, got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window"
                                 " is None")

    def _check_lora(self) -> None:
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise ValueError(f"lora_targets must name some of {LORA_TARGETS}, got"
                             f" {self.lora_targets!r}")
        check_lora_settings(self.lora_rank, self.lora_alpha, self.lora_dropout)

    @property
    def lora_scale(self) -> float:
        """``alpha / r`` of the adapters (``alpha`` defaults to ``2 · r``); 0 without them."""
        if not self.lora_rank:
            return 0.0
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.lora_rank

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width ``Dh``: ``head_dim`` if set, else ``d_model // n_heads``."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_rotary_dim(self) -> int:
        """Rotated dims per head: ``rotary_dim`` if set, else ``Dh``."""
        return self.rotary_dim if self.rotary_dim is not None else self.resolved_head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, ``G = H / Hkv``."""
        return self.n_heads // self.n_kv_heads

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Whether each layer attends through the sliding window (see ``layer_types``)."""
        if self.sliding_window is None:
            return (False,) * self.n_layers
        if self.layer_types is None:
            return (True,) * self.n_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)


#: The fields added for the Hugging Face families. A saved config may leave them out at their
#: defaults, so configs (and checkpoints) written before they existed still compare equal.
FAMILY_SWITCHES = tuple(f.name for f in dataclasses.fields(TransformerConfig)
                        if f.name not in ("vocab_size", "d_model", "n_layers", "n_heads",
                                          "n_kv_heads", "d_ff", "head_dim", "rope_theta",
                                          "norm_eps", "max_len", "tie_embeddings", "qkv_bias",
                                          "param_dtype", "dtype", "remat", "remat_policy",
                                          "scan_layers", "initializer_range"))


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


DTYPES = ("float32", "bfloat16")
REMAT_CHOICES = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """Precision and memory of a model a command trains or samples (its ``--dtype``,
    ``--param-dtype`` and ``--remat`` flags); ``None`` keeps the model's own setting (float32
    and no remat for presets and Hugging Face checkpoints, an earlier run's for
    ``--init-from``). Parameters stored in bfloat16 train with float32 master weights and
    optimiser state (``jaxalign.train.float32_master_weights``)."""

    dtype: str | None = setting(None, "compute dtype of the matmuls (float32 or bfloat16;"
                                " none: the model's own)", choices=DTYPES)
    param_dtype: str | None = setting(None, "dtype the parameters are stored in (bfloat16:"
                                      " float32 master weights and optimiser state; none: the"
                                      " model's own)", choices=DTYPES)
    remat: str | None = setting(None, "recompute activations in the backward pass: none, dots"
                                " (keep the matmul outputs) or full (keep nothing); none given:"
                                " the model's own", choices=REMAT_CHOICES)
    logprob_chunk: int | None = setting(None, "tokens per chunk of the chunked LM head (log-probs"
                                        " without [B, T, V] logits); none: the model's own,"
                                        f" {DEFAULT_LOGPROB_CHUNK} by default")

    def __post_init__(self) -> None:
        for name, choices in (("dtype", DTYPES), ("param_dtype", DTYPES),
                              ("remat", REMAT_CHOICES)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    def overrides(self) -> dict[str, Any]:
        """The :class:`TransformerConfig` fields these settings replace (only those given)."""
        fields: dict[str, Any] = {}
        if self.dtype is not None:
            fields["dtype"] = self.dtype
        if self.param_dtype is not None:
            fields["param_dtype"] = self.param_dtype
        if self.logprob_chunk is not None:
            fields["logprob_chunk"] = self.logprob_chunk
        if self.remat is not None:
            fields["remat"] = self.remat != "none"
            if self.remat != "none":
                fields["remat_policy"] = "dots" if self.remat == "dots" else "nothing"
        return fields
