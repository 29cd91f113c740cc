"""Hugging Face ``config.json`` <-> :class:`TransformerConfig`, for every supported family.

:data:`FAMILIES` is the table the README prints. Reading fills in each family's
``transformers`` defaults for keys an older ``config.json`` leaves out, accepts both the
transformers 5 layout (``rope_parameters``, ``layer_types``) and the 4.x one (``rope_theta`` +
``rope_scaling``, ``sliding_window_pattern``, ``use_sliding_window`` + ``max_window_layers``,
``rope_local_base_freq``), and refuses anything it does not implement with the key and value
named — never a silently different model. Writing emits the transformers 5 layout of the
family the model came from (``config.family``), and checks that reading it back gives the same
model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from jaxalign.models.config import LAYER_TYPES, TransformerConfig

__all__ = ["FAMILIES", "config_from_hf", "config_to_hf", "family_of"]


class Family(NamedTuple):
    """One supported ``model_type``: its architectures and the config defaults that differ
    from the generic ones (``transformers``' own class defaults)."""

    causal_lm: str
    classifier: str
    defaults: dict


_LLAMA = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
          "hidden_act": "silu", "max_position_embeddings": 2048}
_QWEN = {**_LLAMA, "use_sliding_window": False, "sliding_window": 4096,
         "max_window_layers": 28, "max_position_embeddings": 32768}
_GEMMA = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
          "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256,
          "query_pre_attn_scalar": 256, "sliding_window": 4096, "max_position_embeddings": 8192}
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "LlamaForSequenceClassification", _LLAMA),
    "mistral": Family("MistralForCausalLM", "MistralForSequenceClassification",
                      {**_LLAMA, "sliding_window": 4096, "max_position_embeddings": 131072}),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", _QWEN),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3ForSequenceClassification",
                    {**_QWEN, "head_dim": 128}),
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
                     {**_GEMMA, "final_logit_softcapping": 30.0,
                      "attn_logit_softcapping": 50.0}),
    "gemma3_text": Family("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification",
                          {**_GEMMA, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
                           "sliding_window_pattern": 6, "max_position_embeddings": 131072}),
    "phi3": Family("Phi3ForCausalLM", "Phi3ForSequenceClassification",
                   {**_LLAMA, "rms_norm_eps": 1e-5, "sliding_window": None,
                    "max_position_embeddings": 4096}),
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_ROPE_KEYS = {"default": set(), "linear": {"factor"}, "dynamic": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}}
_SLIDING_FAMILIES = ("mistral", "phi3")  # every layer slides when sliding_window is set


def family_of(hf: dict) -> str:
    """The ``model_type`` of a config.json, checked against :data:`FAMILIES`."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise ValueError("model_type='gemma3' is Gemma 3's vision-language model; only its text"
                         " model (model_type='gemma3_text', Gemma3ForCausalLM) is supported")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; expected one of"
                         f" {tuple(FAMILIES)}")
    return model_type


def _rope_fields(spec: dict, where: str, hf: dict) -> dict[str, Any]:
    """TransformerConfig rope fields from one rope dict (``rope_parameters`` or
    ``rope_scaling``); ``where`` names it in errors."""
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise ValueError(f"{where}.rope_type={kind!r} is not supported; supported rope types"
                         f" are {tuple(_ROPE_KEYS)}")
    known = _ROPE_KEYS[kind] | {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where} has {unknown[0]}={spec[unknown[0]]!r}, which rope_type="
                         f"{kind!r} does not use here; it is not supported")
    fields: dict[str, Any] = {"rope_type": kind, "rope_factor": float(spec.get("factor", 1.0))}
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(spec["low_freq_factor"]),
                      rope_high_freq_factor=float(spec["high_freq_factor"]),
                      rope_original_max_len=int(spec.get(
                          "original_max_position_embeddings", hf["max_position_embeddings"])))
    elif kind == "dynamic":
        fields["rope_original_max_len"] = int(hf["max_position_embeddings"])
    return fields


def _rope(hf: dict, family: str) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    if family == "gemma3_text":
        nested = "full_attention" in params or "sliding_attention" in params
        full = dict(params.get("full_attention") or {}) if nested else {
            **(hf.get("rope_scaling") or {}), "rope_theta": hf["rope_theta"]}
        local = dict(params.get("sliding_attention") or {}) if nested else {
            "rope_theta": hf["rope_local_base_freq"]}
        if local.get("rope_type", "default") != "default" or set(local) - {"rope_type",
                                                                            "rope_theta"}:
            raise ValueError(f"rope_parameters.sliding_attention={local}: only default rotary"
                             " embeddings are supported on sliding layers")
        fields = _rope_fields(full, "rope_parameters.full_attention", hf)
        theta = full.get("rope_theta", hf["rope_theta"])
        fields["local_rope_theta"] = float(local.get("rope_theta", hf["rope_local_base_freq"]))
    else:
        spec = dict(params) if params else dict(hf.get("rope_scaling") or {})
        fields = _rope_fields(spec, "rope_parameters" if params else "rope_scaling", hf)
        theta = spec.get("rope_theta", hf["rope_theta"])
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    fields["rope_theta"] = float(theta)
    fields["partial_rotary_factor"] = float(factor)
    return fields


def _layer_types(hf: dict, family: str, n_layers: int) -> tuple[tuple[str, ...] | None,
                                                                 int | None]:
    """``(layer_types, sliding_window)``: which layers slide and by how much."""
    window = hf.get("sliding_window")
    if family in _SLIDING_FAMILIES:
        return None, window
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        return None, None  # transformers sets sliding_window to None: every layer is global
    if family in ("qwen2", "qwen3") and not hf.get("layer_types"):
        first = int(hf.get("max_window_layers", 0))
        types = tuple("sliding_attention" if i >= first else "full_attention"
                      for i in range(n_layers))
    elif hf.get("layer_types"):
        types = tuple(hf["layer_types"])
    elif family == "gemma2":
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention"
                      for i in range(n_layers))
    elif family == "gemma3_text":
        pattern = int(hf.get("sliding_window_pattern", 6))
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                      for i in range(n_layers))
    else:
        return None, None
    if "sliding_attention" not in types:
        return (None, None)
    return types, int(window)


def _refuse(hf: dict, family: str) -> None:
    """Raises for the features no jaxalign switch implements."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported;"
                         " jaxalign models are causal")
    if family not in ("llama",) and hf.get("mlp_bias"):
        raise ValueError(f"mlp_bias=True is not supported for model_type={family!r}")


def config_from_hf(hf: dict, **overrides: Any) -> TransformerConfig:
    """A :class:`TransformerConfig` from a parsed HF ``config.json`` (``overrides`` are other
    TransformerConfig fields: ``dtype``, ``remat``, ``max_len``, ...).

    Raises:
      ValueError: for an architecture or feature this model does not implement, naming the
        config key and its value.
    """
    family = family_of(hf)
    hf = {**FAMILIES[family].defaults, **hf}
    _refuse(hf, family)
    act_key = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
    act = hf.get(act_key) or hf.get("hidden_act")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{act_key}={act!r} is not supported; expected one of"
                         f" {tuple(_ACTIVATIONS)}")
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d_model // n_heads)
    n_layers = int(hf["num_hidden_layers"])
    rope = _rope(hf, family)
    rotary_dim = int(head_dim * rope.pop("partial_rotary_factor"))
    layer_types, window = _layer_types(hf, family, n_layers)
    gemma = family in ("gemma2", "gemma3_text")
    attention_bias = bool(hf.get("attention_bias")) and family != "qwen2"
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf["intermediate_size"]),
        head_dim=None if head_dim == d_model // n_heads else head_dim,
        norm_eps=float(hf["rms_norm_eps"]), max_len=int(hf["max_position_embeddings"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        qkv_bias=family == "qwen2" or attention_bias, o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias")), qk_norm=family in ("qwen3", "gemma3_text"),
        post_norms=gemma, norm_scale_offset=1.0 if gemma else 0.0,
        mlp_activation=_ACTIVATIONS[act], embed_scale=gemma,
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if gemma else None,
        attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping")),
        final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")),
        sliding_window=None if window is None else int(window), layer_types=layer_types,
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        initializer_range=float(hf.get("initializer_range", 0.02)), family=family, **rope)
    if fields["rope_type"] == "dynamic":  # NTK scaling exists to run past the original length
        fields["max_len"] = int(fields["max_len"] * fields["rope_factor"])
    fields.update(overrides)
    return TransformerConfig(**fields)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _rope_to_hf(config: TransformerConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type != "default":
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_len)
    if config.rotary_dim is not None:
        rope["partial_rotary_factor"] = config.rotary_dim / config.resolved_head_dim
    if config.family == "gemma3_text":
        local = {"rope_type": "default",
                 "rope_theta": config.local_rope_theta or config.rope_theta}
        return {"full_attention": rope, "sliding_attention": local}
    return rope


def config_to_hf(config: TransformerConfig, dtype: str, *, reward: bool = False) -> dict:
    """The HF ``config.json`` dict of ``config`` in its family's layout (``family`` ``None``:
    ``qwen2`` with q/k/v biases, else ``llama``); ``reward`` writes the
    ``*ForSequenceClassification`` architecture (one label).

    Raises:
      ValueError: when the family cannot express the config (reading the dict back would give
        a different model), naming the fields.
    """
    family = config.family or ("qwen2" if config.qkv_bias else "llama")
    spec = FAMILIES[family]
    max_positions = (config.rope_original_max_len if config.rope_type == "dynamic"
                     else config.max_len)
    hf: dict[str, Any] = {
        "architectures": [spec.classifier if reward else spec.causal_lm],
        "model_type": family, "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.d_ff,
        "head_dim": config.resolved_head_dim, "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": max_positions, "rope_parameters": _rope_to_hf(config),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range, "dtype": dtype,
        # explicit nulls, so a family's class defaults (Phi-3's pad 32000) never apply;
        # save_hf's extra_config sets the tokenizer's ids
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    act = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
    hf[act] = _HF_ACTIVATIONS[config.mlp_activation]
    if family in ("llama", "qwen3", "gemma2", "gemma3_text"):
        hf["attention_bias"] = config.o_bias
    if family == "llama":
        hf["mlp_bias"] = config.mlp_bias
    if family in ("gemma2", "gemma3_text"):
        scalar = config.query_pre_attn_scalar  # an int in transformers' (strict) config class
        hf.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                  attn_logit_softcapping=config.attn_logit_softcap,
                  final_logit_softcapping=config.final_logit_softcap)
    hf.update(_sliding_to_hf(config, family))
    if reward:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    _check_round_trip(config, hf)
    return hf


def _sliding_to_hf(config: TransformerConfig, family: str) -> dict[str, Any]:
    if family in _SLIDING_FAMILIES or family in ("llama",):
        return {"sliding_window": config.sliding_window} if family != "llama" else {}
    types = config.layer_types or ("full_attention",) * config.n_layers
    if config.sliding_window is not None and config.layer_types is None:
        types = ("sliding_attention",) * config.n_layers
    out: dict[str, Any] = {"layer_types": list(types), "sliding_window": config.sliding_window}
    if family in ("qwen2", "qwen3"):
        sliding = "sliding_attention" in types
        out.update(use_sliding_window=sliding, max_window_layers=(
            types.index("sliding_attention") if sliding else config.n_layers))
    return out


_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers", "max_len")


def _canonical(config: TransformerConfig) -> TransformerConfig:
    """``config`` with the fields that do not change the model written one way (explicit
    head and rotary dims, no rope parameters its type ignores, per-layer types)."""
    defaults = TransformerConfig()
    sliding = config.sliding_layers
    kind = config.rope_type
    return dataclasses.replace(
        config, head_dim=config.resolved_head_dim, rotary_dim=config.resolved_rotary_dim,
        rope_factor=config.rope_factor if kind != "default" else 1.0,
        rope_low_freq_factor=(config.rope_low_freq_factor if kind == "llama3"
                              else defaults.rope_low_freq_factor),
        rope_high_freq_factor=(config.rope_high_freq_factor if kind == "llama3"
                               else defaults.rope_high_freq_factor),
        rope_original_max_len=(config.rope_original_max_len if kind in ("llama3", "dynamic")
                               else None),
        sliding_window=config.sliding_window if any(sliding) else None,
        layer_types=tuple(LAYER_TYPES[s] for s in sliding) if any(sliding) else None,
        local_rope_theta=config.local_rope_theta if any(sliding) else None)


def _check_round_trip(config: TransformerConfig, hf: dict) -> None:
    """Raises unless ``config_from_hf(hf)`` is ``config`` (up to run-time fields)."""
    keep = {name: getattr(config, name) for name in _RUNTIME_FIELDS}
    back = _canonical(config_from_hf(hf, **keep))
    expected = _canonical(dataclasses.replace(config, family=hf["model_type"]))
    diffs = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if getattr(back, f.name) != getattr(expected, f.name)]
    if diffs:
        raise ValueError(f"model_type={hf['model_type']!r} cannot express {', '.join(diffs)}")
