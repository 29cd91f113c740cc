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
Step ``s`` trains on the rows ``DataLoader.indices_at(s - 1)``, a pure function of (seed, s),
and the PRNG key and optimiser state live in the checkpointed
:class:`~jaxalign.train.TrainState`, so a run resumed from step ``k`` logs exactly the lines an
uninterrupted run logs after ``k``; resuming, the loop, logging and checkpointing are
:func:`jaxalign.cli.loop.checkpointed_loop`, shared with ``ppo``.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import distributed, sharding
from jaxalign import train as steps
from jaxalign.batching import map_batches
from jaxalign.cli.configs import PREFERENCE_COMMANDS as _PREFERENCE, TrainConfig
from jaxalign.cli.lora import check_export_adapter, lora_source, optimizer_for
from jaxalign.cli.loop import (RunError, check_checkpoints, checkpointed_loop, prepare_out,
                               summarize)
from jaxalign.cli.options import ConfigError
from jaxalign.cli.run_dir import config_to_dict, final_dir, save_final
from jaxalign.cli.sources import (data_texts, find_tokenizer, fixed_params, load_tokenizer,
                                  mesh_from_spec, model_source)
from jaxalign.data import (
    DataConfig, DataLoader, Dataset, PackedLoader, ShardedLoader, ShardedPackedLoader,
    load_jsonl, pad_pairs, shard_lines,
)
from jaxalign.distributed import is_main_process
from jaxalign.models import PRESETS, TransformerConfig, lora
from jaxalign.tokenizer import Tokenizer

__all__ = ["initial_model", "train"]

_DATA_KINDS = {"sft": ("sft",), "rm": ("preference", "ranking"), "dpo": ("preference",),
               "ipo": ("preference",), "orpo": ("preference",), "kto": ("unpaired",)}


# ------------------------------------------------------------------------------ setup
def _load_tokenizer(config: TrainConfig, out: Path, resuming: bool) -> tuple[Tokenizer, bool]:
    """The run's tokenizer and whether it was trained here (then it is saved in DIR/tokenizer)."""
    init = None if config.init_from is None else str(final_dir(config.init_from))
    source = find_tokenizer(config.tokenizer, init, config.model)
    if source is None and resuming and (out / "tokenizer" / "tokenizer.json").is_file():
        source = out / "tokenizer"
    if source is not None:
        return load_tokenizer(source), False
    if config.model in PRESETS:
        size = config.model_overrides.get("vocab_size", PRESETS[config.model].vocab_size)
        return Tokenizer.train_bpe(data_texts(config.data), vocab_size=int(size)), True
    raise RunError(f"--model {config.model!r} is neither a preset ({', '.join(PRESETS)})"
                   " nor a directory")


def initial_model(kind: str, config: TrainConfig, tokenizer: Tokenizer,
                  key: jax.Array) -> tuple[Any, Any]:
    """``(model, params)`` a run of ``kind`` starts from: a preset (random init from ``key``,
    with the tokenizer's vocabulary), an HF directory (``load_hf``) or an earlier run
    (``--init-from``); ``rm`` puts a score head (from ``key``) on a causal LM's trunk."""
    model, make_params = _config_model_source(kind, config, tokenizer)
    return model, make_params(key)


def _config_model_source(kind: str, config: TrainConfig, tokenizer: Tokenizer,
                         mesh: Any = None) -> tuple[Any, Callable[[jax.Array], Any]]:
    return model_source(kind, tokenizer, model=config.model, init_from=config.init_from,
                        model_overrides=config.model_overrides, mesh=mesh,
                        compute=config.compute)


def _data_config(config: TrainConfig, model_config: TransformerConfig,
                 mesh: Any) -> DataConfig:
    try:  # on a mesh every shard pads to max_length: all processes agree on the batch shape
        return DataConfig(max_length=config.max_length or model_config.max_len,
                          max_prompt_length=config.max_prompt_length,
                          pad_multiple=config.pad_multiple, on_bad_record=config.on_bad_record,
                          pad_to_max=mesh is not None)
    except ValueError as error:
        raise RunError(str(error)) from None


def _load_data(kind: str, config: TrainConfig, tokenizer: Tokenizer,
               model_config: TransformerConfig, mesh: Any) -> tuple[dict[int, Dataset], Any]:
    """``({shard: dataset}, loader)``: the whole data file, tokenised, as one shard; on a mesh
    the shards of this process (each reads only its lines). Raises ``DataError`` on a bad
    record with 'error'."""
    expected = _DATA_KINDS[kind]
    _check_packing(kind, config)
    num_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if num_shards % jax.process_count():
        raise RunError(f"the mesh's data x fsdp = {num_shards} batch shards do not split over"
                       f" {jax.process_count()} processes")
    per_process = num_shards // jax.process_count()
    first = jax.process_index() * per_process
    datasets = {}
    for shard in range(first, first + per_process):
        dataset = load_jsonl(config.data, tokenizer,
                             kind=expected[0] if len(expected) == 1 else None,
                             config=_data_config(config, model_config, mesh),
                             lines=None if mesh is None else shard_lines(shard, num_shards))
        if dataset.kind not in expected:
            raise RunError(f"{kind} needs {' or '.join(expected)} records but {config.data}"
                           f" holds {dataset.kind} records")
        if is_main_process():
            print(dataset.report.summary(), file=sys.stderr)
        datasets[shard] = dataset
    try:
        if config.pack.packing != "none":
            loader = _packed_loader(kind, config, datasets, mesh)
        elif mesh is None:
            loader = DataLoader(datasets[0], config.batch_size, seed=config.seed)
        else:
            loader = ShardedLoader(datasets, config.batch_size, num_shards=num_shards,
                                   seed=config.seed)
    except ValueError as error:
        raise RunError(str(error)) from None
    return datasets, loader


def _check_packing(kind: str, config: TrainConfig) -> None:
    """Refuses a ``--packing`` the command cannot train on (before any data is read)."""
    packing = config.pack.packing
    if packing == "none":
        return
    wanted = "sequences" if kind == "sft" else "pairs"
    if kind in ("rm", "kto") or packing != wanted:
        other = "" if kind in ("rm", "kto") else f" or {wanted}"
        raise ConfigError(f"{kind} takes --packing none{other}, got --packing {packing}")


def _packed_loader(kind: str, config: TrainConfig, datasets: dict[int, Dataset],
                   mesh: Any) -> PackedLoader | ShardedPackedLoader:
    """``--packing``'s loader (its report printed: cut tokens, slot fill); on a mesh every
    data shard packs its own rows into one shared shape."""
    include_prompt = kind == "sft" and config.include_prompt
    if mesh is None:
        loader = PackedLoader(datasets[0], config.batch_size, config.pack, seed=config.seed,
                              include_prompt=include_prompt)
    else:
        loader = ShardedPackedLoader(datasets, config.batch_size, config.pack,
                                     num_shards=mesh.shape["data"] * mesh.shape["fsdp"],
                                     seed=config.seed, include_prompt=include_prompt)
    if is_main_process():
        print(loader.report.summary(), file=sys.stderr)
    return loader


@functools.lru_cache(maxsize=4)
def _reference_fn(model: Any) -> Any:
    return steps.make_reference_logps_fn(model)


def _reference_logps(model: Any, params: Any, dataset: Dataset,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(chosen, rejected)`` log-prob sums ``[N]`` of every pair, in dataset order."""
    reference_fn = _reference_fn(model)
    logps = map_batches(lambda _, indices: reference_fn(params, dataset.collate(indices)),
                        [np.arange(len(dataset))], batch_size)
    return logps["ref_chosen_logps"], logps["ref_rejected_logps"]


@functools.lru_cache(maxsize=8)
def _training_fns(kind: str, model: Any, optimizer_options: tuple, step_options: tuple,
                  mesh: Any) -> tuple:
    """``(step, optimizer, schedule)`` for a model and its hyperparameters
    (cached, so a process running several jobs on one model, e.g. a demo or a resume, compiles
    once)."""
    options = dict(optimizer_options)
    optimizer = optimizer_for(model, steps.make_optimizer(**options))  # LoRA: adapters only
    step_options = {**dict(step_options), "mesh": mesh}
    if kind == "sft":
        step = steps.make_sft_step(model, optimizer, **step_options)
    elif kind == "rm":
        step = steps.make_reward_step(model, optimizer, **step_options)
    elif kind == "kto":
        step = steps.make_unpaired_step(model, optimizer, **step_options)
    else:
        step = steps.make_preference_step(model, optimizer, **step_options)
    return step, optimizer, jax.jit(steps.optimizer_schedule(**options))


def _count_tokens(batch: dict[str, np.ndarray]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


@jax.jit
def _global_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    """Real tokens of a (global, sharded) batch: a replicated scalar read at log time."""
    return sum(jnp.sum(v) for k, v in batch.items() if k.endswith("attention_mask"))


class _Job(NamedTuple):
    """What a training run reads and checks before it writes anything."""

    out: Path
    resuming: bool
    tokenizer: Tokenizer
    new_tokenizer: bool  # trained here: saved in DIR/tokenizer
    model: Any
    make_params: Callable[[jax.Array], Any]
    datasets: dict[int, Dataset]  # this process's data shards (one without a mesh)
    loader: Any  # DataLoader, ShardedLoader on a mesh, or PackedLoader (--packing)
    mesh: Any


def _read_job(kind: str, config: TrainConfig) -> _Job:
    """Checks the options and reads the tokenizer, model source and the data (all of it, or on
    a multi-process mesh this process's shards)."""
    if kind not in _DATA_KINDS:
        raise RunError(f"unknown kind {kind!r}; choose one of {', '.join(_DATA_KINDS)}")
    if config.data is None or config.out is None:
        raise RunError("--data and --out are required (as flags or in --config)")
    if not os.path.isfile(config.data):
        raise RunError(f"--data {config.data}: no such file")
    if os.environ.get("JAXALIGN_COORDINATOR") and not jax.distributed.is_initialized():
        distributed.initialize()
    mesh = mesh_from_spec(config.mesh)
    if mesh is not None and config.precompute_ref and jax.process_count() > 1:
        raise ConfigError("--precompute-ref with several processes is not supported yet: keep"
                          " the reference in the state (the default) or run one process")
    out = Path(config.out).absolute()
    resuming = prepare_out(out, resume=config.resume)
    tokenizer, new_tokenizer = _load_tokenizer(config, out, resuming)
    model, make_params = _config_model_source(kind, config, tokenizer, mesh)
    model, make_params = lora_source(model, make_params, config.lora, seed=config.seed,
                                     flag=f"--model {config.model}")
    check_export_adapter(model, config.export_adapter, "--init-from a LoRA run")
    datasets, loader = _load_data(kind, config, tokenizer, model.config, mesh)
    return _Job(out, resuming, tokenizer, new_tokenizer, model, make_params, datasets, loader,
                mesh)


def _initial_state(kind: str, config: TrainConfig, job: _Job, optimizer: Any,
                   loss_state: Any) -> tuple[Any, Any]:
    """``(state, reference)``: the placed initial train state (created sharded on a mesh) and
    the precomputed reference log-probs per data shard (``None`` unless --precompute-ref)."""
    model, mesh = job.model, job.mesh
    init_key, state_key = jax.random.split(jax.random.key(config.seed))
    needs_reference = kind in _PREFERENCE and config.preference_config(kind).needs_reference
    precompute = needs_reference and config.precompute_ref and kind != "kto"
    make_params, reference = job.make_params, None
    if precompute:  # the reference log-probs first, from the initial params
        if mesh is None:
            params = make_params(init_key)
        else:
            shapes = jax.eval_shape(make_params, init_key)
            params = jax.jit(make_params, out_shardings=sharding.param_shardings(
                model, shapes, mesh))(init_key)
        size = config.batch_size // len(job.datasets) if mesh is not None else config.batch_size
        ref_params = lora.base_params(params)  # LoRA: the adapters off
        reference = {k: _reference_logps(model, ref_params, d, max(size, 1))
                     for k, d in job.datasets.items()}
        make_params = fixed_params(params)
    with_reference = needs_reference and not precompute and not lora.is_lora(model)
    if mesh is not None:
        state = steps.create_sharded_train_state(
            make_params, optimizer, state_key, mesh=mesh, model=model, params_key=init_key,
            with_reference=with_reference, loss_state=loss_state)
        return state, reference
    params = make_params(init_key)
    state = _create_state_fn(optimizer)(params, key=state_key, loss_state=loss_state,
                                        ref_params=params if with_reference else None)
    # One placement for every leaf (restored ones are committed to a device too): a state whose
    # leaves differ in placement from the step's outputs would compile the step a second time.
    return jax.device_put(state, jax.local_devices()[0]), reference


@functools.lru_cache(maxsize=8)
def _create_state_fn(optimizer: Any) -> Any:
    # create_train_state copies the reference params: the step donates params. The loss state
    # (BCO's baseline, arrays) is an argument, not part of the cache key.
    return jax.jit(functools.partial(steps.create_train_state, optimizer=optimizer))


def train(kind: str, config: TrainConfig) -> dict[str, Any]:
    """Runs one ``jaxalign KIND`` training job; returns the summary (also in summary.json)."""
    began = time.perf_counter()
    job = _read_job(kind, config)  # everything read and checked before anything is written
    out, model, mesh = job.out, job.model, job.mesh
    model_config = config_to_dict(model.config)
    if job.resuming:  # before compiling anything
        check_checkpoints(out / "checkpoints", kind, model_config)
    out.mkdir(parents=True, exist_ok=True)
    if job.new_tokenizer and is_main_process():
        job.tokenizer.save(out / "tokenizer")
    step_fn, optimizer, schedule = _training_fns(
        kind, model, tuple(config.optimizer_options().items()),
        tuple(config.step_options(kind).items()), mesh)
    loss_state = (steps.init_loss_state(config.preference_config(kind)) if kind == "kto"
                  else None)  # BCO's running baseline (arrays: never part of a cache key)
    state, reference = _initial_state(kind, config, job, optimizer, loss_state)

    def train_step(state: Any, step: int) -> tuple[Any, dict, Any]:
        batch = _batch_at(job, reference, step - 1)
        if mesh is None:
            tokens = _count_tokens(batch)
        else:
            batch = sharding.shard_batch(batch, mesh)
            tokens = _global_tokens(batch)
        state, metrics = step_fn(state, batch)
        return state, metrics, tokens

    def learning_rate(step: int) -> dict[str, float]:
        return {"lr": float(schedule((step - 1) // config.grad_accum_steps))}

    result, start = checkpointed_loop(
        state, train_step, config=config, kind=kind, out=out, loader=job.loader,
        resuming=job.resuming, model_config=model_config,
        began=began, extra=learning_rate)
    final = hf_dir = None
    if result.step == config.steps:
        final, hf_dir = save_final(out, kind, model, result.state.params, job.tokenizer,
                                   result.step, config.export_hf, config.export_adapter)
    summary = summarize(kind, result, start=start, total=config.steps, out=out, final=final,
                        hf_dir=hf_dir, final_loss=result.final_metrics.get("loss"))
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    where = final or f"{out / 'checkpoints'} (resume with --resume)"
    if is_main_process():
        print(f"jaxalign {kind}: {result.step - start} steps (to step {result.step}/"
              f"{config.steps}), final loss {loss}, {result.wall_time_s:.1f} s,"
              f" {result.tokens_per_s:.0f} tokens/s -> {where}")
    return summary


def _batch_at(job: _Job, reference: Any, index: int) -> dict[str, np.ndarray]:
    """This process's rows of batch ``index`` (0-based), with their reference log-probs."""
    if isinstance(job.loader, PackedLoader):
        rows = job.loader.indices_at(index)
        batch = job.loader.collate(rows)
        if reference is not None:  # [P] pair slots, zero where no pair is
            capacity = job.loader.spec.capacity
            batch["ref_chosen_logps"] = pad_pairs(reference[0][0], rows, capacity)
            batch["ref_rejected_logps"] = pad_pairs(reference[0][1], rows, capacity)
        return batch
    if isinstance(job.loader, ShardedPackedLoader):
        indices = job.loader.indices_at(index)
        batch = job.loader.collate(indices)
        if reference is not None:
            capacity = job.loader.spec.capacity
            for side, column in (("chosen", 0), ("rejected", 1)):
                batch[f"ref_{side}_logps"] = np.concatenate([
                    pad_pairs(reference[k][column], rows, capacity) for k, rows in indices.items()])
        return batch
    if isinstance(job.loader, DataLoader):
        indices = {0: job.loader.indices_at(index)}
    else:
        indices = {k: loader.indices_at(index) for k, loader in job.loader.shards.items()}
    parts = []
    for shard, rows in indices.items():
        part = job.datasets[shard].collate(rows)
        if reference is not None:
            part["ref_chosen_logps"] = reference[shard][0][rows]
            part["ref_rejected_logps"] = reference[shard][1][rows]
        parts.append(part)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
