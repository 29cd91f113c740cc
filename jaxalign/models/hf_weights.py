"""Which Hugging Face tensor each jaxalign parameter comes from, for every supported family.

:func:`weight_table` lists the checkpoint's tensors as :class:`HFTensor` s; each is made of one
or more :class:`Part` s (several for Phi-3's fused ``qkv_proj`` / ``gate_up_proj``), a row range
of the HF tensor and the jaxalign parameter it becomes. HF linear weights are ``[out, in]`` and
are transposed (``"linear"``); everything else is reshaped (``"reshape"``). No rotary
permutation is needed: both sides use the ``rotate_half`` layout.

  ``model.embed_tokens.weight [V, D]``              -> ``trunk.embedding [V, D]``
  ``model.layers.i.self_attn.q_proj.weight``        -> ``attn.q_proj.kernel [D, H, Dh]``
  ``model.layers.i.self_attn.{k,v}_proj.weight``    -> ``attn.{k,v}_proj.kernel [D, Hkv, Dh]``
  ``model.layers.i.self_attn.{q,k,v}_proj.bias``    -> ``attn.{q,k,v}_proj.bias [H|Hkv, Dh]``
  ``model.layers.i.self_attn.o_proj.weight``        -> ``attn.o_proj.kernel [H, Dh, D]``
  ``model.layers.i.self_attn.{q,k}_norm.weight``    -> ``attn.{q,k}_norm.scale [Dh]``
  ``model.layers.i.self_attn.qkv_proj.weight``      -> q/k/v kernels (Phi-3, rows split)
  ``model.layers.i.mlp.{gate,up,down}_proj.weight`` -> ``mlp.{gate,up,down}_proj.kernel``
  ``model.layers.i.mlp.gate_up_proj.weight``        -> gate/up kernels (Phi-3, rows split)
  ``model.layers.i.input_layernorm.weight``         -> ``attn_norm.scale``
  ``model.layers.i.post_attention_layernorm.weight``-> ``mlp_norm.scale`` (Gemma: ``post_attn_norm``)
  ``model.layers.i.pre_feedforward_layernorm``      -> ``mlp_norm.scale`` (Gemma 2/3)
  ``model.layers.i.post_feedforward_layernorm``     -> ``post_mlp_norm.scale`` (Gemma 2/3)
  ``model.norm.weight``                             -> ``trunk.final_norm.scale``
  ``lm_head.weight [V, D]``                         -> ``lm_head.kernel [D, V]``
  ``score.weight [1, D]``                           -> ``score_head.kernel [D]`` (reward models)
"""

from __future__ import annotations

import math

from typing import NamedTuple

from jaxalign.models.config import TransformerConfig

__all__ = ["HFTensor", "Part", "weight_table"]

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Part(NamedTuple):
    """Rows ``[start, stop)`` of an HF tensor that become the parameter at ``path``."""

    path: tuple[str, ...]
    shape: tuple[int, ...]  # the jaxalign parameter's shape
    start: int
    stop: int
    kind: str  # "linear": [out, in] rows -> transposed; "reshape": reshaped


class HFTensor(NamedTuple):
    """One tensor of the checkpoint: its name, shape and the parameters it holds."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]


def _linear(name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> HFTensor:
    """A ``[out, in]`` HF weight whose transpose, reshaped, is the kernel of ``shape``."""
    fan_in = shape[0] if len(shape) == 2 or path[-2] != "o_proj" else shape[0] * shape[1]
    out = int(math.prod(shape) // fan_in)
    return HFTensor(name, (out, fan_in), (Part(path, shape, 0, out, "linear"),))


def _plain(name: str, path: tuple[str, ...], shape: tuple[int, ...],
           hf_shape: tuple[int, ...] | None = None) -> HFTensor:
    hf_shape = hf_shape or (int(math.prod(shape)),)
    return HFTensor(name, hf_shape, (Part(path, shape, 0, hf_shape[0], "reshape"),))


def _fused(name: str, parts: list[tuple[tuple[str, ...], tuple[int, ...]]],
           fan_in: int) -> HFTensor:
    """Phi-3's row-concatenated ``qkv_proj`` / ``gate_up_proj``: each part a row range."""
    start, out = 0, []
    for path, shape in parts:
        rows = math.prod(shape) // fan_in
        out.append(Part(path, shape, start, start + rows, "linear"))
        start += rows
    return HFTensor(name, (start, fan_in), tuple(out))


def _attention(config: TransformerConfig, pre: str, path: tuple[str, ...],
               fused: bool) -> list[HFTensor]:
    d, dh = config.d_model, config.resolved_head_dim
    shapes = {"q_proj": (d, config.n_heads, dh), "k_proj": (d, config.n_kv_heads, dh),
              "v_proj": (d, config.n_kv_heads, dh)}
    if fused:
        tensors = [_fused(f"{pre}qkv_proj.weight",
                          [((*path, p, "kernel"), s) for p, s in shapes.items()], d)]
    else:
        tensors = [_linear(f"{pre}{p}.weight", (*path, p, "kernel"), s) for p, s in shapes.items()]
    if config.qkv_bias:
        tensors += [_plain(f"{pre}{p}.bias", (*path, p, "bias"), s[1:]) for p, s in shapes.items()]
    tensors.append(_linear(f"{pre}o_proj.weight", (*path, "o_proj", "kernel"),
                           (config.n_heads, dh, d)))
    if config.o_bias:
        tensors.append(_plain(f"{pre}o_proj.bias", (*path, "o_proj", "bias"), (d,)))
    if config.qk_norm:
        tensors += [_plain(f"{pre}{n}.weight", (*path, n, "scale"), (dh,))
                    for n in ("q_norm", "k_norm")]
    return tensors


def _mlp(config: TransformerConfig, pre: str, path: tuple[str, ...],
         fused: bool) -> list[HFTensor]:
    d, ff = config.d_model, config.d_ff
    shapes = {"gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    if fused:
        tensors = [_fused(f"{pre}gate_up_proj.weight",
                          [((*path, p, "kernel"), shapes[p]) for p in ("gate_proj", "up_proj")], d),
                   _linear(f"{pre}down_proj.weight", (*path, "down_proj", "kernel"), (ff, d))]
    else:
        tensors = [_linear(f"{pre}{p}.weight", (*path, p, "kernel"), s) for p, s in shapes.items()]
    if config.mlp_bias:
        tensors += [_plain(f"{pre}{p}.bias", (*path, p, "bias"), s[1:]) for p, s in shapes.items()]
    return tensors


def _norms(config: TransformerConfig, pre: str, path: tuple[str, ...]) -> list[HFTensor]:
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    if config.post_norms:  # Gemma 2/3 sandwich: post_attention_layernorm follows the attention
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
                 "pre_feedforward_layernorm": "mlp_norm",
                 "post_feedforward_layernorm": "post_mlp_norm"}
    return [_plain(f"{pre}{hf}.weight", (*path, ours, "scale"), (config.d_model,))
            for hf, ours in names.items()]


def weight_table(config: TransformerConfig, head: str = "lm") -> list[HFTensor]:
    """Every tensor of the HF checkpoint of ``config`` (``head``: ``"lm"`` for a causal LM,
    ``"score"`` for a ``*ForSequenceClassification`` reward model), in checkpoint order."""
    fused = config.family == "phi3"
    d = config.d_model
    tensors = [_plain("model.embed_tokens.weight", ("trunk", "embedding"),
                      (config.vocab_size, d), (config.vocab_size, d))]
    for i in range(config.n_layers):
        pre, path = f"model.layers.{i}.", ("trunk", f"layers_{i}")
        tensors += _attention(config, pre + "self_attn.", (*path, "attn"), fused)
        tensors += _mlp(config, pre + "mlp.", (*path, "mlp"), fused)
        tensors += _norms(config, pre, path)
    tensors.append(_plain("model.norm.weight", ("trunk", "final_norm", "scale"), (d,)))
    if head == "score":
        tensors.append(_plain("score.weight", ("score_head", "kernel"), (d,), (1, d)))
    elif not config.tie_embeddings:
        tensors.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d, config.vocab_size)))
    return tensors
