"""A finished run's files: ``DIR/final/`` (``params/`` Orbax, ``config.json``, ``tokenizer/``)
and ``DIR/hf/`` (Hugging Face safetensors), as every ``jaxalign`` command writes them.

``config.json`` is ``{"model_type": "causal_lm" | "reward_model", "kind", "step",
"model_config"}``; :func:`load_final` reads the model back, ``--init-from``, ``ppo --policy``,
``rs --policy``, ``ppo --reward`` and ``label --judge`` take such a directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxalign import sharding
from jaxalign.models import CausalLM, RewardModel, TransformerConfig, init_params
from jaxalign.models.config import FAMILY_SWITCHES
from jaxalign.models.lora_peft import save_merged_hf, save_peft_adapter
from jaxalign.cli.loop import RunError
from jaxalign.distributed import is_main_process
from jaxalign.tokenizer import Tokenizer

__all__ = ["config_from_dict", "config_to_dict", "final_dir", "load_final", "save_final"]

_MODEL_TYPES = {"causal_lm": CausalLM, "reward_model": RewardModel}


def config_to_dict(config: TransformerConfig) -> dict[str, Any]:
    """A model config as plain JSON (dtypes by name), as stored in checkpoints and config.json;
    the family switches at their defaults are left out (``FAMILY_SWITCHES``), so a preset's
    dict, and the checkpoints of runs from before them, stay as they were."""
    values = dataclasses.asdict(config)
    for name in ("dtype", "param_dtype"):
        values[name] = jnp.dtype(values[name]).name
    default = TransformerConfig()
    for name in FAMILY_SWITCHES:
        if values[name] == getattr(default, name):
            del values[name]
    return values


def config_from_dict(values: dict[str, Any]) -> TransformerConfig:
    """Inverse of :func:`config_to_dict`."""
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunError(f"unknown model config fields {unknown}")
    return TransformerConfig(**values)


def final_dir(path: str | os.PathLike) -> Path:
    """``DIR/final`` (or ``DIR`` itself) of a finished run; raises :class:`RunError` if none."""
    path = Path(path)
    for candidate in (path / "final", path):
        if (candidate / "config.json").is_file() and (candidate / "params").is_dir():
            return candidate.absolute()
    raise RunError(f"{path} holds no finished jaxalign run (expected {path}/final/config.json)")



def load_final(path: str | os.PathLike,
               mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, params, info)`` of a finished run's ``final/`` (``path`` = DIR or DIR/final).

    With a ``mesh`` each device reads only its shard of every parameter (laid out by the
    model's logical axes); else the params land on the first local device. ``info`` is
    ``final/config.json``; the tokenizer is ``Tokenizer.from_file(DIR/final/tokenizer)``.
    """
    final = final_dir(path)
    info = json.loads((final / "config.json").read_text(encoding="utf-8"))
    model = _MODEL_TYPES[info["model_type"]](config_from_dict(info["model_config"]))
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = sharding.param_shardings(model, shapes, mesh)
    abstract = jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        shapes, shardings)
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(final / "params", abstract)
    checkpointer.close()
    return model, params, info


def save_final(out: Path, kind: str, model: Any, params: Any, tokenizer: Tokenizer,
               step: int, export_hf: bool,
               export_adapter: bool = False) -> tuple[Path, Path | None]:
    """Writes ``out/final`` (params, config.json, tokenizer) and, with ``export_hf``, ``out/hf``
    (a LoRA model's adapters merged in) so that :func:`load_final` and ``--init-from`` read it;
    with ``export_adapter``, a LoRA model's adapters in PEFT's format in ``out/adapter``. Every
    process calls it (the params save is collective); only process 0 writes the rest."""
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(final / "params", params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    model_type = "reward_model" if isinstance(model, RewardModel) else "causal_lm"
    info = {"model_type": model_type, "kind": kind, "step": step,
            "model_config": config_to_dict(model.config)}
    if is_main_process():
        (final / "config.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(final / "tokenizer")
    hf_dir = None
    if export_hf or export_adapter:
        hf_dir = out / "hf" if export_hf else None
        if jax.process_count() > 1:  # every process takes part in the gather
            from jax.experimental import multihost_utils  # noqa: PLC0415

            params = multihost_utils.process_allgather(params, tiled=True)
        if is_main_process():
            stops = tokenizer.stop_ids  # every stop id, as the checkpoint's generation config
            pad = tokenizer.pad_id
            if pad is None and isinstance(model, RewardModel):  # HF's scorer needs one
                pad = tokenizer.padding_id
            ids = {"bos_token_id": tokenizer.bos_id, "pad_token_id": pad,
                   "eos_token_id": stops[0] if len(stops) == 1 else (list(stops) or None)}
            ids = {k: v for k, v in ids.items() if v is not None}
            generation = {**ids, **(tokenizer.generation_config or {})}  # the checkpoint's wins
            if export_hf:
                tokenizer.save(hf_dir)  # first: save_hf's generation_config.json is the merged one
            if export_adapter:
                save_peft_adapter(model, params, out / "adapter")
            if export_hf:
                save_merged_hf(model, params, hf_dir, extra_config=ids,
                               generation_config=generation)
    return final, hf_dir
