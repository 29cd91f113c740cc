"""The training run behind ``jaxalign sft|rm|dpo|ipo|orpo`` (layer 3: files, clocks, progress).

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
from step ``k`` logs exactly the lines an uninterrupted run logs after ``k`` (metrics.jsonl is
cut back to step ``k`` first; wall-clock figures go to TensorBoard and the summary only).
The loop syncs with the device only on logged steps (``jax.device_get`` of the metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter
from tqdm import tqdm

from jaxalign import train as steps
from jaxalign.checkpoint import CheckpointMismatchError, Checkpointer, config_mismatches
from jaxalign.cli import TrainConfig
from jaxalign.data import DataConfig, DataLoader, Dataset, load_jsonl
from jaxalign.models import (
    PRESETS, CausalLM, RewardModel, TransformerConfig, get_config, init_head_from_causal_lm,
    init_params, load_hf, save_hf,
)
from jaxalign.tokenizer import Tokenizer, apply_chat_template

__all__ = ["RunError", "config_from_dict", "config_to_dict", "initial_model", "load_final", "train"]

_MODEL_TYPES = {"causal_lm": CausalLM, "reward_model": RewardModel}
_DATA_KINDS = {"sft": ("sft",), "rm": ("preference", "ranking"), "dpo": ("preference",),
               "ipo": ("preference",), "orpo": ("preference",)}
# Options that change the trajectory: resuming with other values is allowed, but warned about.
_TRAJECTORY_OPTIONS = ("data", "steps", "lr", "warmup_steps", "end_lr_ratio", "weight_decay",
                       "max_grad_norm", "grad_accum_steps", "beta", "label_smoothing", "lam",
                       "center_coef", "include_prompt", "precompute_ref", "max_length",
                       "max_prompt_length", "pad_multiple")


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# ------------------------------------------------------------------------------ model configs
def config_to_dict(config: TransformerConfig) -> dict[str, Any]:
    """A model config as plain JSON (dtypes by name), as stored in checkpoints and config.json."""
    values = dataclasses.asdict(config)
    for name in ("dtype", "param_dtype"):
        values[name] = jnp.dtype(values[name]).name
    return values


def config_from_dict(values: dict[str, Any]) -> TransformerConfig:
    """Inverse of :func:`config_to_dict`."""
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunError(f"unknown model config fields {unknown}")
    return TransformerConfig(**values)


def _final_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    for candidate in (path / "final", path):
        if (candidate / "config.json").is_file() and (candidate / "params").is_dir():
            return candidate.absolute()
    raise RunError(f"{path} holds no finished jaxalign run (expected {path}/final/config.json)")


def load_final(path: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, params, info)`` of a finished run's ``final/`` (``path`` = DIR or DIR/final).

    ``info`` is ``final/config.json``; the tokenizer is ``Tokenizer.from_file(DIR/final/tokenizer)``.
    """
    final = _final_dir(path)
    info = json.loads((final / "config.json").read_text(encoding="utf-8"))
    model = _MODEL_TYPES[info["model_type"]](config_from_dict(info["model_config"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(final / "params", abstract)
    checkpointer.close()
    return model, params, info


def _save_final(out: Path, kind: str, model: Any, params: Any, tokenizer: Tokenizer,
                step: int, export_hf: bool) -> tuple[Path, Path | None]:
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(final / "params", params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    model_type = "reward_model" if isinstance(model, RewardModel) else "causal_lm"
    info = {"model_type": model_type, "kind": kind, "step": step,
            "model_config": config_to_dict(model.config)}
    (final / "config.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(final / "tokenizer")
    hf_dir = None
    if export_hf:
        hf_dir = out / "hf"
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
        save_hf(model, params, hf_dir, extra_config={k: v for k, v in ids.items() if v is not None})
        tokenizer.save(hf_dir)
    return final, hf_dir


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
        source = _final_dir(config.init_from) / "tokenizer"
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


def _model_source(kind: str, config: TrainConfig,
                  tokenizer: Tokenizer) -> tuple[Any, Callable[[jax.Array], Any]]:
    """The model a run trains and ``key -> initial params`` (a preset is initialised lazily, so
    that bad data is reported before any compilation)."""
    if config.init_from is not None or os.path.isdir(config.model):
        if config.model_overrides:
            raise RunError("--model-overrides applies to presets, not to --init-from or an HF"
                           " model directory")
        if config.init_from is not None:
            source = f"--init-from {config.init_from}"
            model, params, _ = load_final(config.init_from)
        else:
            source = f"--model {config.model}"
            try:
                model, params = load_hf(config.model)
            except (OSError, ValueError, KeyError) as error:
                raise RunError(f"{source}: cannot load a Hugging Face model: {error}") from None
        make_params = lambda key: params  # noqa: E731
    else:
        source = f"--model {config.model}"
        overrides = {**config.model_overrides, "vocab_size": tokenizer.vocab_size}
        if config.model_overrides.get("vocab_size", tokenizer.vocab_size) < tokenizer.vocab_size:
            raise RunError(f"model_overrides vocab_size={config.model_overrides['vocab_size']}"
                           f" is smaller than the tokenizer's {tokenizer.vocab_size} ids")
        try:
            model_config = get_config(config.model, **overrides)
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
    model, make_params = _model_source(kind, config, tokenizer)
    return model, make_params(key)


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
    schedule = steps.learning_rate_schedule(
        options["learning_rate"], total_steps=options["total_steps"],
        warmup_steps=options["warmup_steps"], end_lr_ratio=options["end_lr_ratio"])
    if kind == "sft":
        step = steps.make_sft_step(model, optimizer, **dict(step_options))
    elif kind == "rm":
        step = steps.make_reward_step(model, optimizer, **dict(step_options))
    else:
        step = steps.make_preference_step(model, optimizer, loss=kind, **dict(step_options))
    create_state = jax.jit(functools.partial(steps.create_train_state, optimizer=optimizer))
    return step, create_state, jax.jit(schedule)


def _checkpoint_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


# ------------------------------------------------------------------------------ logging
class _Log:
    """metrics.jsonl, TensorBoard and the progress bar; measures tokens/s between log steps."""

    def __init__(self, out: Path, kind: str, config: TrainConfig, start: int) -> None:
        path = out / "metrics.jsonl"
        kept = []
        if start and path.exists():  # drop what a crashed run logged after its last checkpoint
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _logged_step(line) <= start]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
        self.bar = tqdm(total=config.steps, initial=start, desc=f"jaxalign {kind}", unit="step",
                        disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
        self.config, self.tokens = config, 0
        self.first_log: tuple[float, int] | None = None  # (time, tokens) after the first log
        self.last_log = (time.perf_counter(), 0)

    def log(self, step: int, metrics: dict[str, Any], lr: float) -> dict[str, float]:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "lr": lr}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        now = time.perf_counter()
        rate = (self.tokens - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
        self.last_log = (now, self.tokens)
        self.first_log = self.first_log or self.last_log
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.add_scalar("perf/tokens_per_s", rate, step)
        loss = record["loss"]
        if self.config.progress:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        else:
            print(f"step {step}/{self.config.steps} loss {loss:.4f} tokens/s {rate:.0f}",
                  file=sys.stderr)
        return record

    def steady_rate(self, started: float) -> float:
        """Tokens/s after the first logged step (which includes compilation) when possible."""
        now = time.perf_counter()
        begin_time, begin_tokens = self.first_log or (started, 0)
        if self.tokens == begin_tokens:
            begin_time, begin_tokens = started, 0
        return (self.tokens - begin_tokens) / max(now - begin_time, 1e-9)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.file.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn or foreign line (so it is dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _count_tokens(batch: dict[str, np.ndarray]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


# ------------------------------------------------------------------------------ resuming
def _check_checkpoints(directory: Path, kind: str, model_config: dict[str, Any]) -> None:
    """Raises unless the latest checkpoint is from this command and this model config."""
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        metadata = ckpt.read_metadata()
    if metadata.get("kind") != kind:
        raise RunError(f"the checkpoints in {directory} are from 'jaxalign"
                       f" {metadata.get('kind')}', not 'jaxalign {kind}'")
    problems = config_mismatches(metadata.get("model_config", {}), model_config)
    if problems:
        raise CheckpointMismatchError("; ".join(problems))


def _restore(ckpt: Checkpointer, state: Any, loader: DataLoader, config: TrainConfig,
             model_config: dict[str, Any]) -> tuple[Any, int]:
    """The latest checkpoint's state and step; moves the loader there; warns about options
    that changed since (they make the metrics differ from an uninterrupted run)."""
    state, metadata = ckpt.restore(state, config=model_config)
    try:
        loader.restore(metadata["loader"])
    except ValueError as error:
        raise RunError(f"cannot resume: {error}") from None
    old_args, new_args = metadata.get("args", {}), dataclasses.asdict(config)
    changed = [f"{k}: {old_args.get(k)!r} -> {new_args[k]!r}" for k in _TRAJECTORY_OPTIONS
               if old_args.get(k) != new_args[k]]
    if changed:
        print(f"warning: resuming with changed options ({'; '.join(changed)}); the metrics"
              " will differ from an uninterrupted run", file=sys.stderr)
    return state, int(metadata["step"])


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
    existing = _checkpoint_steps(out / "checkpoints")
    if existing and not config.resume:
        raise RunError(f"{out / 'checkpoints'} already holds checkpoints (latest step"
                       f" {existing[-1]}); pass --resume to continue, or another --out")
    if config.resume and not existing:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting at step 0",
              file=sys.stderr)
    resuming = bool(existing)
    init_key, state_key = jax.random.split(jax.random.key(config.seed))

    # Read and check everything (the whole data file too) before writing anything.
    tokenizer, new_tokenizer = _load_tokenizer(config, out, resuming)
    model, make_params = _model_source(kind, config, tokenizer)
    dataset = _load_data(kind, config, tokenizer, model.config)
    try:
        loader = DataLoader(dataset, config.batch_size, seed=config.seed)
    except ValueError as error:
        raise RunError(str(error)) from None

    model_config = config_to_dict(model.config)
    if resuming:  # before compiling anything
        _check_checkpoints(out / "checkpoints", kind, model_config)

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
            state, start = _restore(ckpt, state, loader, config, model_config)
        except BaseException:
            ckpt.close()
            raise

    def checkpoint_metadata(step: int) -> dict[str, Any]:
        loader.step = step  # the next batch to train on
        return {"kind": kind, "step": step, "loader": loader.state(),
                "model_config": model_config, "args": dataclasses.asdict(config)}

    end = min(config.stop_at or config.steps, config.steps)
    log = _Log(out, kind, config, start)
    started = time.perf_counter()
    metrics, step = None, start
    try:
        for step in range(start + 1, end + 1):
            indices = loader.indices_at(step - 1)
            batch = dataset.collate(indices)
            if reference is not None:
                batch["ref_chosen_logps"] = reference[0][indices]
                batch["ref_rejected_logps"] = reference[1][indices]
            log.tokens += _count_tokens(batch)
            state, metrics = step_fn(state, batch)
            if step == 1 or step % config.log_every == 0 or step == config.steps:
                lr = float(schedule((step - 1) // config.grad_accum_steps))
                log.log(step, jax.device_get(metrics), lr)
            if step % config.save_every == 0:
                ckpt.save(step, state, metadata=checkpoint_metadata(step), force=True)
            log.bar.update(1)
        final_metrics = {k: float(v) for k, v in jax.device_get(metrics or {}).items()}
        wall_time = time.perf_counter() - began  # setup and compilation included
        tokens_per_s = log.steady_rate(started)
        ckpt.save(step, state, metadata=checkpoint_metadata(step), force=True)
    finally:
        log.close()
        ckpt.close()

    final_dir = hf_dir = None
    if step == config.steps:
        final_dir, hf_dir = _save_final(out, kind, model, state.params, tokenizer, step,
                                        config.export_hf)
    summary = {
        "kind": kind, "steps": step, "start_step": start, "total_steps": config.steps,
        "finished": step == config.steps, "final_loss": final_metrics.get("loss"),
        "final_metrics": final_metrics, "wall_time_s": wall_time, "tokens": log.tokens,
        "tokens_per_s": tokens_per_s, "out": str(out),
        "final_dir": final_dir and str(final_dir), "hf_dir": hf_dir and str(hf_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    where = final_dir or f"{out / 'checkpoints'} (resume with --resume)"
    print(f"jaxalign {kind}: {step - start} steps (to step {step}/{config.steps}), final loss"
          f" {loss}, {wall_time:.1f} s, {tokens_per_s:.0f} tokens/s -> {where}")
    return summary
