"""Building a ``jaxalign sft|rm|dpo|ipo|orpo`` run: tokenizer, model, data, final-model files.

A run directory ``DIR`` (``--out``) holds::

    tokenizer/           the byte-level BPE trained on --data (only when no tokenizer was given)
    metrics.jsonl        one JSON object per logged step: {"step", "loss", ..., "lr"}
    tb/                  TensorBoard event files (tensorboardX), the same scalars + tokens/s
    checkpoints/<step>/  Orbax train state + metadata {"kind", "step", "loader", "model_config",
                         "args"}, every --save-every steps and at the end
    final/               params/ (Orbax), config.json {"model_config", "model_type", ...},
                         tokenizer/ — written when the last step (--steps) is reached
    hf/                  Hugging Face safetensors + tokenizer (--export-hf)
    summary.json         what :func:`train` returns

Everything is read and checked (the whole data file included) before anything is written.
Batch ``s`` is ``DataLoader.batch_at(s)``, a pure function of (seed, s), and the PRNG key and
optimiser state live in the checkpointed :class:`~jaxalign.train.TrainState`, so a run resumed
from step ``k`` logs exactly the lines an uninterrupted run logs after ``k``; the loop, logging
and checkpointing are :func:`jaxalign.run_loop.run_loop`, shared with ``ppo``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import train as steps
from jaxalign.checkpoint import Checkpointer
from jaxalign.cli import TrainConfig
from jaxalign.data import DataConfig, DataLoader, Dataset, load_jsonl
from jaxalign.models import (
    PRESETS, CausalLM, RewardModel, TransformerConfig, get_config, init_head_from_causal_lm,
    init_params, load_hf,
)
from jaxalign.run_dir import config_from_dict, config_to_dict, final_dir, load_final, save_final
from jaxalign.run_loop import (RunError, check_checkpoints, prepare_out, restore, run_loop,
                               write_summary)
from jaxalign.tokenizer import Tokenizer, apply_chat_template

__all__ = ["RunError", "config_from_dict", "config_to_dict", "final_dir", "initial_model",
           "load_final", "model_source", "save_final", "train"]

_DATA_KINDS = {"sft": ("sft",), "rm": ("preference", "ranking"), "dpo": ("preference",),
               "ipo": ("preference",), "orpo": ("preference",)}
# Options that change the trajectory: resuming with other values is allowed, but warned about.
_TRAJECTORY_OPTIONS = ("data", "steps", "lr", "warmup_steps", "end_lr_ratio", "weight_decay",
                       "max_grad_norm", "grad_accum_steps", "beta", "label_smoothing", "lam",
                       "center_coef", "include_prompt", "precompute_ref", "max_length",
                       "max_prompt_length", "pad_multiple")


# ------------------------------------------------------------------------------ setup
def _data_texts(path: str) -> Iterator[str]:
    """Every text of a JSONL file, to train a tokenizer on (bad lines are left to the loader)."""
    with open(path, "rb") as f:
        for raw_line in f:
            try:
                record = json.loads(raw_line)
                values = [record.get(k) for k in ("prompt", "chosen", "rejected", "completion")]
                values += record.get("responses") or []
            except (ValueError, AttributeError, TypeError):
                continue
            for value in values:
                try:
                    yield value if isinstance(value, str) else apply_chat_template(value)
                except (ValueError, TypeError):
                    continue


def _load_tokenizer(config: TrainConfig, out: Path, resuming: bool) -> tuple[Tokenizer, bool]:
    """The run's tokenizer and whether it was trained here (then it is saved in DIR/tokenizer)."""
    if config.tokenizer is not None:
        source = Path(config.tokenizer)
    elif config.init_from is not None:
        source = final_dir(config.init_from) / "tokenizer"
    elif os.path.isdir(config.model):
        source = Path(config.model)
    elif resuming and (out / "tokenizer" / "tokenizer.json").is_file():
        source = out / "tokenizer"
    elif config.model in PRESETS:
        size = config.model_overrides.get("vocab_size", PRESETS[config.model].vocab_size)
        return Tokenizer.train_bpe(_data_texts(config.data), vocab_size=int(size)), True
    else:
        raise RunError(f"--model {config.model!r} is neither a preset ({', '.join(PRESETS)})"
                       " nor a directory")
    if not (source.is_file() or (source / "tokenizer.json").is_file()):
        raise RunError(f"no tokenizer at {source} (expected a tokenizer.json or a directory"
                       " holding one)")
    return Tokenizer.from_file(source), False


def model_source(kind: str, tokenizer: Tokenizer, *, model: str = "tiny",
                 init_from: str | None = None, model_overrides: dict | None = None,
                 flag: str | None = None) -> tuple[Any, Callable[[jax.Array], Any]]:
    """The model a ``kind`` run trains and ``key -> initial params``: a preset ``model`` (with
    ``model_overrides`` and the tokenizer's vocabulary; initialised lazily, so that bad data is
    reported before any compilation), an HF directory ``model``, or an earlier run
    ``init_from``. ``rm`` puts a score head on a causal LM's trunk; other kinds need a causal
    LM. ``flag`` names the source in messages (default ``--init-from DIR`` / ``--model X``)."""
    if init_from is not None or os.path.isdir(model):
        if model_overrides:
            raise RunError("--model-overrides applies to presets, not to --init-from or an HF"
                           " model directory")
        if init_from is not None:
            source = flag or f"--init-from {init_from}"
            model, params, _ = load_final(init_from)
        else:
            source = flag or f"--model {model}"
            try:
                model, params = load_hf(model)
            except (OSError, ValueError, KeyError) as error:
                raise RunError(f"{source}: cannot load a Hugging Face model: {error}") from None
        make_params = lambda key: params  # noqa: E731
    else:
        source = flag or f"--model {model}"
        model_overrides = model_overrides or {}
        overrides = {**model_overrides, "vocab_size": tokenizer.vocab_size}
        if model_overrides.get("vocab_size", tokenizer.vocab_size) < tokenizer.vocab_size:
            raise RunError(f"model_overrides vocab_size={model_overrides['vocab_size']}"
                           f" is smaller than the tokenizer's {tokenizer.vocab_size} ids")
        try:
            model_config = get_config(model, **overrides)
        except TypeError as error:
            raise RunError(f"bad --model-overrides: {error}") from None
        model = (RewardModel if kind == "rm" else CausalLM)(model_config)
        make_params = _init_fn(model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RunError(f"the tokenizer has {tokenizer.vocab_size} ids but {source} has"
                       f" vocab_size={model.config.vocab_size}")
    if kind == "rm" and not isinstance(model, RewardModel):
        lm_params = make_params(None)
        model = RewardModel(model.config)
        make_params = functools.partial(init_head_from_causal_lm, model, lm_params)
    elif kind != "rm" and not isinstance(model, CausalLM):
        raise RunError(f"{kind} trains a causal LM but {source} holds a {type(model).__name__}")
    return model, make_params


def initial_model(kind: str, config: TrainConfig, tokenizer: Tokenizer,
                  key: jax.Array) -> tuple[Any, Any]:
    """``(model, params)`` a run of ``kind`` starts from: a preset (random init from ``key``,
    with the tokenizer's vocabulary), an HF directory (``load_hf``) or an earlier run
    (``--init-from``); ``rm`` puts a score head (from ``key``) on a causal LM's trunk."""
    model, make_params = _config_model_source(kind, config, tokenizer)
    return model, make_params(key)


def _config_model_source(kind: str, config: TrainConfig,
                         tokenizer: Tokenizer) -> tuple[Any, Callable[[jax.Array], Any]]:
    return model_source(kind, tokenizer, model=config.model, init_from=config.init_from,
                        model_overrides=config.model_overrides)


def _load_data(kind: str, config: TrainConfig, tokenizer: Tokenizer,
               model_config: TransformerConfig) -> Dataset:
    """The whole data file, tokenised (raises ``DataError`` on a bad record with 'error')."""
    try:
        data_config = DataConfig(max_length=config.max_length or model_config.max_len,
                                 max_prompt_length=config.max_prompt_length,
                                 pad_multiple=config.pad_multiple,
                                 on_bad_record=config.on_bad_record)
    except ValueError as error:
        raise RunError(str(error)) from None
    expected = _DATA_KINDS[kind]
    dataset = load_jsonl(config.data, tokenizer, kind=expected[0] if len(expected) == 1 else None,
                         config=data_config)
    if dataset.kind not in expected:
        raise RunError(f"{kind} needs {' or '.join(expected)} records but {config.data} holds"
                       f" {dataset.kind} records")
    print(dataset.report.summary(), file=sys.stderr)
    return dataset


@functools.lru_cache(maxsize=4)
def _reference_fn(model: Any, loss: str) -> Any:
    return steps.make_reference_logps_fn(model, loss=loss)


@functools.lru_cache(maxsize=4)
def _init_fn(model: Any) -> Any:
    return jax.jit(functools.partial(init_params, model))  # eagerly: ~100 compilations


def _reference_logps(model: Any, params: Any, dataset: Dataset, batch_size: int,
                     loss: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(chosen, rejected)`` log-probs ``[N]`` of every pair, in dataset order."""
    reference_fn = _reference_fn(model, loss)
    n = len(dataset)
    outputs = []
    for start in range(0, n, batch_size):  # the last batch repeats indices to keep one shape
        indices = np.resize(np.arange(start, min(start + batch_size, n)), batch_size)
        outputs.append(reference_fn(params, dataset.collate(indices)))
    host = jax.device_get(outputs)
    return tuple(np.concatenate([o[name] for o in host])[:n]
                 for name in ("ref_chosen_logps", "ref_rejected_logps"))


@functools.lru_cache(maxsize=8)
def _training_fns(kind: str, model: Any, optimizer_options: tuple, step_options: tuple) -> tuple:
    """``(step, create_state, schedule)``, jitted, for a model and its hyperparameters (cached,
    so a process running several jobs on one model, e.g. a demo or a resume, compiles once)."""
    options = dict(optimizer_options)
    optimizer = steps.make_optimizer(**options)
    schedule = steps.optimizer_schedule(**options)
    if kind == "sft":
        step = steps.make_sft_step(model, optimizer, **dict(step_options))
    elif kind == "rm":
        step = steps.make_reward_step(model, optimizer, **dict(step_options))
    else:
        step = steps.make_preference_step(model, optimizer, loss=kind, **dict(step_options))
    create_state = jax.jit(functools.partial(steps.create_train_state, optimizer=optimizer))
    return step, create_state, jax.jit(schedule)


def _count_tokens(batch: dict[str, np.ndarray]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


# ------------------------------------------------------------------------------ the run
def train(kind: str, config: TrainConfig) -> dict[str, Any]:
    """Runs one ``jaxalign KIND`` training job; returns the summary (also in summary.json)."""
    began = time.perf_counter()
    if kind not in _DATA_KINDS:
        raise RunError(f"unknown kind {kind!r}; choose one of {', '.join(_DATA_KINDS)}")
    if config.data is None or config.out is None:
        raise RunError("--data and --out are required (as flags or in --config)")
    if not os.path.isfile(config.data):
        raise RunError(f"--data {config.data}: no such file")
    if config.export_hf and kind == "rm":
        raise RunError("--export-hf writes causal LMs (Llama layout); a reward model stays in"
                       " DIR/final (load it with jaxalign.runner.load_final)")
    out = Path(config.out).absolute()
    resuming = prepare_out(out, resume=config.resume)
    init_key, state_key = jax.random.split(jax.random.key(config.seed))

    # Read and check everything (the whole data file too) before writing anything.
    tokenizer, new_tokenizer = _load_tokenizer(config, out, resuming)
    model, make_params = _config_model_source(kind, config, tokenizer)
    dataset = _load_data(kind, config, tokenizer, model.config)
    try:
        loader = DataLoader(dataset, config.batch_size, seed=config.seed)
    except ValueError as error:
        raise RunError(str(error)) from None

    model_config = config_to_dict(model.config)
    if resuming:  # before compiling anything
        check_checkpoints(out / "checkpoints", kind, model_config)

    params = make_params(init_key)
    out.mkdir(parents=True, exist_ok=True)
    if new_tokenizer:
        tokenizer.save(out / "tokenizer")
    step_fn, create_state, schedule = _training_fns(
        kind, model, tuple(config.optimizer_options().items()),
        tuple(config.step_options(kind).items()))
    reference, ref_params = None, None
    if kind in ("dpo", "ipo"):
        if config.precompute_ref:
            reference = _reference_logps(model, params, dataset, config.batch_size, kind)
        else:
            ref_params = params  # create_train_state copies it: the step donates params
    state = create_state(params, key=state_key, ref_params=ref_params)
    # One placement for every leaf (restored ones are committed to a device too): a state whose
    # leaves differ in placement from the step's outputs would compile the step a second time.
    state = jax.device_put(state, jax.local_devices()[0])
    del params

    ckpt = Checkpointer(out / "checkpoints", save_every=config.save_every,
                        max_to_keep=config.keep)
    start = 0
    if resuming:
        try:
            state, start = restore(ckpt, state, loader, dataclasses.asdict(config),
                                   _TRAJECTORY_OPTIONS, model_config)
        except BaseException:
            ckpt.close()
            raise

    def checkpoint_metadata(step: int) -> dict[str, Any]:
        loader.step = step  # the next batch to train on
        return {"kind": kind, "step": step, "loader": loader.state(),
                "model_config": model_config, "args": dataclasses.asdict(config)}

    def train_step(state: Any, step: int) -> tuple[Any, dict, int]:
        indices = loader.indices_at(step - 1)
        batch = dataset.collate(indices)
        if reference is not None:
            batch["ref_chosen_logps"] = reference[0][indices]
            batch["ref_rejected_logps"] = reference[1][indices]
        tokens = _count_tokens(batch)
        state, metrics = step_fn(state, batch)
        return state, metrics, tokens

    def learning_rate(step: int) -> dict[str, float]:
        return {"lr": float(schedule((step - 1) // config.grad_accum_steps))}

    end = min(config.stop_at or config.steps, config.steps)
    result = run_loop(state, train_step, start=start, end=end, total=config.steps, out=out,
                      kind=kind, ckpt=ckpt, checkpoint_metadata=checkpoint_metadata,
                      log_every=config.log_every, save_every=config.save_every,
                      progress=config.progress, began=began, extra=learning_rate)
    step = result.step
    final = hf_dir = None
    if step == config.steps:
        final, hf_dir = save_final(out, kind, model, result.state.params, tokenizer, step,
                                        config.export_hf)
    summary = {
        "kind": kind, "steps": step, "start_step": start, "total_steps": config.steps,
        "finished": step == config.steps, "final_loss": result.final_metrics.get("loss"),
        "final_metrics": result.final_metrics, "wall_time_s": result.wall_time_s,
        "tokens": result.tokens, "tokens_per_s": result.tokens_per_s, "out": str(out),
        "final_dir": final and str(final), "hf_dir": hf_dir and str(hf_dir),
    }
    write_summary(out, summary)
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    where = final or f"{out / 'checkpoints'} (resume with --resume)"
    print(f"jaxalign {kind}: {step - start} steps (to step {step}/{config.steps}), final loss"
          f" {loss}, {result.wall_time_s:.1f} s, {result.tokens_per_s:.0f} tokens/s -> {where}")
    return summary
