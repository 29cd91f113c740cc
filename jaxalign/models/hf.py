"""Read and write Hugging Face checkpoints of the Llama family (Llama, Mistral, Qwen2).

``load_hf(path)`` reads ``config.json`` and ``*.safetensors`` (one file, or shards listed in
``model.safetensors.index.json``) from a local directory; ``save_hf(model, params, path)`` writes
a directory ``transformers`` loads with ``LlamaForCausalLM.from_pretrained`` (or
``Qwen2ForCausalLM`` for a model with q/k/v biases). Only the ``safetensors`` library is
used: no torch, no network.

Weight mapping (HF ``[out, in]`` linear weights are transposed; no rotary permutation is
needed because both sides use the "rotate_half" convention):

  ``model.embed_tokens.weight [V, D]``            -> ``trunk.embedding [V, D]``
  ``model.layers.i.self_attn.q_proj.weight``      -> ``attn.q_proj.kernel [D, H, Dh]``
  ``model.layers.i.self_attn.{k,v}_proj.weight``  -> ``attn.{k,v}_proj.kernel [D, Hkv, Dh]``
  ``model.layers.i.self_attn.o_proj.weight``      -> ``attn.o_proj.kernel [H, Dh, D]``
  ``model.layers.i.mlp.{gate,up,down}_proj.weight`` -> ``mlp.{gate,up,down}_proj.kernel``
  ``model.layers.i.{input,post_attention}_layernorm.weight`` -> ``{attn,mlp}_norm.scale``
  ``model.norm.weight``                           -> ``trunk.final_norm.scale``
  ``lm_head.weight [V, D]``                       -> ``lm_head.kernel [D, V]``
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign.models.config import TransformerConfig
from jaxalign.models.heads import CausalLM
from jaxalign.models.transformer import stack_layer_params, unstack_layer_params

_SUPPORTED = ("llama", "mistral", "qwen2")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (rope, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"rope_type={kind!r} (rope scaling) is not supported; only default rotary "
                "embeddings are implemented"
            )
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, **overrides: Any) -> TransformerConfig:
    """A :class:`TransformerConfig` from a parsed HF ``config.json``.

    Raises:
      ValueError: for an architecture or feature this model does not implement.
    """
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"model_type={model_type!r} is not supported; expected one of {_SUPPORTED}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=True (biases on q/k/v and o_proj) is not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported")
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"layer_types={sorted(set(layer_types))} (only 'full_attention')")
    max_len = int(hf.get("max_position_embeddings", 2048))
    if hf.get("sliding_window") is not None and model_type == "mistral":
        # Sliding-window attention equals full attention while sequences fit in the window.
        max_len = min(max_len, int(hf["sliding_window"]))
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf["intermediate_size"]),
        head_dim=None if head_dim in (None, d_model // n_heads) else int(head_dim),
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_len=max_len,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def config_to_hf(config: TransformerConfig, dtype: str) -> dict:
    """The HF ``config.json`` dict for ``config`` (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``)."""
    model_type = "qwen2" if config.qkv_bias else "llama"
    hf = {
        "architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.d_ff,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_len,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise ValueError(f"path={path!r} has no *.safetensors files")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        with safe_open(file, framework="np") as f:
            keys = list(f.keys())
            bf16 = {key for key in keys if f.get_slice(key).get_dtype() == "BF16"}
            tensors.update({key: f.get_tensor(key) for key in keys if key not in bf16})
        if bf16:  # numpy has no bfloat16: read those through the jax frontend (ml_dtypes)
            with safe_open(file, framework="flax") as f:
                tensors.update({key: np.asarray(f.get_tensor(key)) for key in bf16})
    return tensors


def _hf_to_params(tensors: dict[str, np.ndarray], config: TransformerConfig) -> dict:
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    used = set()

    def take(name):
        if name not in weights:
            raise ValueError(f"checkpoint is missing weight {name!r}")
        used.add(name)
        return np.asarray(weights[name])

    d, h, kv, dh = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim
    trunk = {"embedding": take("embed_tokens.weight"), "final_norm": {"scale": take("norm.weight")}}
    for i in range(config.n_layers):
        pre = f"layers.{i}."
        attn = {}
        for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            attn[proj] = {"kernel": take(f"{pre}self_attn.{proj}.weight").T.reshape(d, heads, dh)}
            if config.qkv_bias:
                attn[proj]["bias"] = take(f"{pre}self_attn.{proj}.bias").reshape(heads, dh)
        attn["o_proj"] = {"kernel": take(f"{pre}self_attn.o_proj.weight").T.reshape(h, dh, d)}
        mlp = {p: {"kernel": take(f"{pre}mlp.{p}.weight").T}
               for p in ("gate_proj", "up_proj", "down_proj")}
        trunk[f"layers_{i}"] = {
            "attn_norm": {"scale": take(f"{pre}input_layernorm.weight")},
            "attn": attn,
            "mlp_norm": {"scale": take(f"{pre}post_attention_layernorm.weight")},
            "mlp": mlp,
        }
    params = {"trunk": trunk}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": take("lm_head.weight").T}
    elif "lm_head.weight" in weights:
        used.add("lm_head.weight")  # a tied checkpoint may store the copy too
    unused = [k for k in weights if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unused:
        raise ValueError(f"checkpoint has weights this model does not use: {sorted(unused)[:8]}")
    return params


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **config_overrides: Any,
) -> tuple[CausalLM, Any]:
    """Load a local HF Llama/Mistral/Qwen2 directory as a :class:`CausalLM` and its params.

    Args:
      path: directory with ``config.json`` and ``*.safetensors``.
      dtype: compute dtype of the returned model.
      param_dtype: dtype the parameters are converted to.
      **config_overrides: other :class:`TransformerConfig` fields (``remat``, ``scan_layers``).

    Returns:
      ``(model, params)``, params unboxed: ``model.apply({"params": params}, tokens, mask)``.

    Raises:
      ValueError: unsupported architecture or feature (rope scaling, sliding window, biases
        other than Qwen2's q/k/v ones), or missing / unexpected weights.
    """
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    params = _hf_to_params(_read_safetensors(path), config)
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, config.param_dtype), params)
    if config.scan_layers:
        params = stack_layer_params(params, config.n_layers)
    return CausalLM(config), params


def save_hf(
    model: CausalLM, params: Any, path: str | os.PathLike, *, extra_config: dict | None = None
) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` can load.

    Args:
      model: a :class:`CausalLM`.
      params: its unboxed parameters (scanned or unrolled layout).
      path: output directory (created if needed).
      extra_config: more ``config.json`` entries, e.g. ``{"eos_token_id": 2}``.
    """
    config = model.config
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    params = unstack_layer_params(params, config.n_layers)
    dtype = jnp.dtype(config.param_dtype)
    d, h, kv, dh = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim

    def host(x):
        return np.ascontiguousarray(np.asarray(jax.device_get(x)).astype(dtype))

    trunk = params["trunk"]
    out = {"model.embed_tokens.weight": host(trunk["embedding"]),
           "model.norm.weight": host(trunk["final_norm"]["scale"])}
    for i in range(config.n_layers):
        layer, pre = trunk[f"layers_{i}"], f"model.layers.{i}."
        attn = layer["attn"]
        for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            kernel = attn[proj]["kernel"].reshape(d, heads * dh)
            out[f"{pre}self_attn.{proj}.weight"] = host(kernel.T)
            if config.qkv_bias:
                out[f"{pre}self_attn.{proj}.bias"] = host(attn[proj]["bias"].reshape(heads * dh))
        out[f"{pre}self_attn.o_proj.weight"] = host(attn["o_proj"]["kernel"].reshape(h * dh, d).T)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{pre}mlp.{proj}.weight"] = host(layer["mlp"][proj]["kernel"].T)
        out[f"{pre}input_layernorm.weight"] = host(layer["attn_norm"]["scale"])
        out[f"{pre}post_attention_layernorm.weight"] = host(layer["mlp_norm"]["scale"])
    if not config.tie_embeddings:
        out["lm_head.weight"] = host(params["lm_head"]["kernel"].T)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(config, "bfloat16" if dtype == jnp.bfloat16 else str(dtype))
    hf.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
