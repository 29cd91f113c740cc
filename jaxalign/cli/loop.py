"""The training loop every ``jaxalign`` run shares: logging, checkpoints, exact resume.

    resuming = prepare_out(out, resume=config.resume)          # refuses checkpoints without it
    check_checkpoints(out / "checkpoints", kind, model_config) # if resuming, before compiling
    result, start = checkpointed_loop(state, step_fn, config=config, kind=kind, out=out,
                                      loader=loader, resuming=resuming, ...)
    summary = summarize(kind, result, start=start, total=config.steps, out=out, ...)

``step_fn(state, step) -> (state, metrics, tokens)`` runs step ``step`` (1-based) and must be a
pure function of the state and ``step`` (batch ``step - 1`` of a ``DataLoader``, a PRNG key
folded from the step), so that a run resumed from a checkpoint at ``k`` logs exactly the lines
an uninterrupted run logs after ``k``. :class:`RunLog` writes ``metrics.jsonl`` (cut back to
step ``k`` on resume; wall-clock figures go to TensorBoard and the summary only), TensorBoard
scalars and a tqdm bar. The loop syncs with the device only on logged steps. In a multi-process
run every process calls the loop (checkpoints are collective) and only process 0 writes logs.

Stopping early: SIGTERM during :func:`checkpointed_loop` checkpoints the last finished step at
the next step boundary and returns (``LoopResult.stopped_by == "SIGTERM"``, ``summary.json``
``"stopped_by"``); the command then exits with :data:`jaxalign.cli.exits.PREEMPTED_EXIT`.
Checkpoints are written in the background, are complete or absent (a SIGKILL mid-save leaves
the previous one), and a damaged latest one is reported and the one before it resumed from
(:class:`~jaxalign.checkpoint.Checkpointer`). A write that fails (a full disk) raises an
``OSError`` naming the path; ``metrics.jsonl`` is cut back on resume by writing a new file and
renaming it over the old one, so a crash then loses no line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jaxalign.distributed import is_main_process
from jaxalign.checkpoint import (CheckpointCorruptError, CheckpointMismatchError, Checkpointer,
                                 config_mismatches)
from jaxalign.cli.exits import StopSignal
from jaxalign.cli.options import flat_values
from jaxalign.cli.run_log import RunLog, naming_path
from jaxalign.data import DataLoader

__all__ = ["LoopResult", "RunError", "RunLog", "check_checkpoints", "checkpoint_steps",
           "checkpointed_loop", "prepare_out", "restore", "run_loop", "summarize", "write_summary"]


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_steps(directory: Path) -> list[int]:
    """The steps with a checkpoint directory in ``directory``, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _check_out_path(out: Path) -> None:
    """Raises :class:`RunError` unless ``out`` is, or can become, a directory (checked before
    anything is written: a file in the way, or a file where a parent directory should be)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "it" if path == out else str(path)
                raise RunError(f"--out {out} cannot be a run directory: {what} is a file"
                               " (name a directory)")
            if not os.access(path, os.W_OK | os.X_OK):
                raise RunError(f"--out {out}: {path} is not writable")
            return


def prepare_out(out: Path, *, resume: bool) -> bool:
    """Whether the run resumes from ``out/checkpoints``; raises if ``out`` cannot be a
    directory, or holds checkpoints and ``resume`` is false (notes on stderr when ``resume``
    finds none)."""
    _check_out_path(out)
    existing = checkpoint_steps(out / "checkpoints")
    if existing and not resume:
        raise RunError(f"{out / 'checkpoints'} already holds checkpoints (latest step"
                       f" {existing[-1]}); pass --resume to continue, or another --out")
    if resume and not existing:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting at step 0",
              file=sys.stderr)
    return bool(existing)


def check_checkpoints(directory: Path, kind: str, model_config: dict[str, Any]) -> None:
    """Raises unless the latest checkpoint is from this command and this model config."""
    try:
        with Checkpointer(directory, max_to_keep=None, read_only=True) as ckpt:
            metadata = ckpt.read_metadata()  # the newest one whose metadata reads
    except CheckpointCorruptError as error:
        raise RunError(f"cannot resume: {error}") from None
    if metadata.get("kind") != kind:
        raise RunError(f"the checkpoints in {directory} are from 'jaxalign"
                       f" {metadata.get('kind')}', not 'jaxalign {kind}'")
    problems = config_mismatches(metadata.get("model_config", {}), model_config)
    if problems:
        raise CheckpointMismatchError("; ".join(problems))


def restore(ckpt: Checkpointer, state: Any, loader: DataLoader, args: dict[str, Any],
            trajectory_options: Iterable[str], model_config: dict[str, Any]) -> tuple[Any, int]:
    """The latest checkpoint's state and step; moves the loader there; warns about the
    ``trajectory_options`` of ``args`` that changed since (the metrics will then differ from an
    uninterrupted run)."""
    def report(message: str) -> None:
        if is_main_process():
            print(f"warning: {message}", file=sys.stderr)

    try:
        state, metadata = ckpt.restore(state, config=model_config, report=report)
    except CheckpointCorruptError as error:
        raise RunError(f"cannot resume: {error}; start afresh without --resume") from None
    try:
        loader.restore(metadata["loader"])
    except ValueError as error:
        raise RunError(f"cannot resume: {error}") from None
    old_args = metadata.get("args", {})
    changed = [f"{k}: {old_args.get(k)!r} -> {args[k]!r}" for k in trajectory_options
               if old_args.get(k) != json.loads(json.dumps(args[k]))]  # tuples read as lists
    if changed and is_main_process():
        print(f"warning: resuming with changed options ({'; '.join(changed)}); the metrics"
              " will differ from an uninterrupted run", file=sys.stderr)
    return state, int(metadata["step"])


# ------------------------------------------------------------------------------ the loop
class LoopResult(NamedTuple):
    state: Any
    step: int  # the last step done
    final_metrics: dict[str, float]  # of the last step ({} when no step ran)
    wall_time_s: float  # since ``began``: setup and compilation included
    tokens: int
    tokens_per_s: float  # after the first logged step when possible
    stopped_by: str | None = None  # "SIGTERM" when a signal stopped the run early


def run_loop(state: Any, step_fn: Callable[[Any, int], tuple[Any, dict, Any]], *, start: int,
             end: int, total: int, out: Path, kind: str, ckpt: Checkpointer,
             checkpoint_metadata: Callable[[int], dict[str, Any]], log_every: int,
             save_every: int, progress: bool, began: float, headline: str = "loss",
             extra: Callable[[int], dict[str, float]] = lambda step: {},
             stop: StopSignal | None = None) -> LoopResult:
    """Steps ``start + 1 … end`` of a run of ``total`` steps: logs steps 1, every
    ``log_every``-th and ``total`` (``{"step", **metrics, **extra(step)}``), checkpoints every
    ``save_every``-th and the last one; closes ``ckpt`` (also on error), waiting for its
    background save. When ``stop`` requests it at a step boundary, the loop ends there: the
    last step done is checkpointed and ``stopped_by`` says why."""
    log = RunLog(out, kind, total=total, start=start, progress=progress, headline=headline,
                 enabled=is_main_process())
    started = time.perf_counter()
    metrics, step, stopped_by = None, start, None
    try:
        for step in range(start + 1, end + 1):
            if stop is not None and stop.requested(step - 1):
                step, stopped_by = step - 1, stop.received
                break
            state, metrics, tokens = step_fn(state, step)
            log.add_tokens(tokens)
            if step == 1 or step % log_every == 0 or step == total:
                log.log(step, jax.device_get(metrics), extra(step))
            if step % save_every == 0:
                ckpt.save(step, state, metadata=checkpoint_metadata(step))
            log.bar.update(1)
        final_metrics = {k: float(v) for k, v in jax.device_get(metrics or {}).items()}
        wall_time = time.perf_counter() - began
        tokens_per_s = log.steady_rate(started)
        if step > start or stopped_by is None:
            ckpt.save(step, state, metadata=checkpoint_metadata(step))
    except BaseException:
        _close_after_failure(log, ckpt)
        raise
    try:
        log.close()
    finally:
        ckpt.close()  # waits for the background save
    return LoopResult(state, step, final_metrics, wall_time, log.tokens, tokens_per_s,
                      stopped_by)


def _close_after_failure(log: RunLog, ckpt: Checkpointer) -> None:
    """Closes both after an error, which stays the one raised (a full disk also fails the
    closing flushes)."""
    with contextlib.suppress(Exception):
        log.close()
    with contextlib.suppress(Exception):
        ckpt.close()


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``out/summary.json`` (process 0 only)."""
    if is_main_process():
        with naming_path(out / "summary.json"):
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n",
                                              encoding="utf-8")


# Options that do not change a run's trajectory: resuming with others changed is allowed but
# warned about (the metrics then differ from an uninterrupted run's).
BOOKKEEPING_OPTIONS = ("out", "resume", "progress", "save_every", "keep", "log_every",
                       "stop_at", "export_hf", "export_adapter", "on_bad_record", "tokenizer")


def checkpointed_loop(state: Any, step_fn: Callable[[Any, int], tuple[Any, dict, Any]], *,
                      config: Any, kind: str, out: Path, loader: DataLoader, resuming: bool,
                      model_config: dict[str, Any], began: float, headline: str = "loss",
                      extra: Callable[[int], dict[str, float]] = lambda step: {}
                      ) -> tuple[LoopResult, int]:
    """The skeleton every checkpointed command shares: restore the latest checkpoint when
    ``resuming``, run :func:`run_loop` to ``--stop-at`` or ``--steps``, checkpoint with the
    loader's position and ``config``'s options as metadata. ``config`` has ``steps``,
    ``stop_at``, ``save_every``, ``keep``, ``log_every``, ``progress``. Returns the loop's
    result and the step it started from. SIGTERM from the restore on stops the loop at the
    next step boundary, after checkpointing the last step done (``result.stopped_by``)."""
    with StopSignal() as stop:
        return _checkpointed_loop(state, step_fn, config=config, kind=kind, out=out,
                                  loader=loader, resuming=resuming, model_config=model_config,
                                  began=began, headline=headline, extra=extra, stop=stop)


def _checkpointed_loop(state: Any, step_fn: Callable[[Any, int], tuple[Any, dict, Any]], *,
                       config: Any, kind: str, out: Path, loader: DataLoader, resuming: bool,
                       model_config: dict[str, Any], began: float, headline: str,
                       extra: Callable[[int], dict[str, float]],
                       stop: StopSignal) -> tuple[LoopResult, int]:
    args = flat_values(config)
    trajectory_options = [k for k in args if k not in BOOKKEEPING_OPTIONS]
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=config.keep)
    start = 0
    if resuming:
        try:
            state, start = restore(ckpt, state, loader, args, trajectory_options, model_config)
        except BaseException:
            ckpt.close()
            raise

    def checkpoint_metadata(step: int) -> dict[str, Any]:
        loader.step = step  # the next batch to train on
        return {"kind": kind, "step": step, "loader": loader.state(),
                "model_config": model_config, "args": args}

    end = min(config.stop_at or config.steps, config.steps)
    result = run_loop(state, step_fn, start=start, end=end, total=config.steps, out=out,
                      kind=kind, ckpt=ckpt, checkpoint_metadata=checkpoint_metadata,
                      log_every=config.log_every, save_every=config.save_every,
                      progress=config.progress, began=began, headline=headline, extra=extra,
                      stop=stop)
    return result, start


def summarize(kind: str, result: LoopResult, *, start: int, total: int, out: Path,
              final: Path | None, hf_dir: Path | None, **fields: Any) -> dict[str, Any]:
    """The summary of a checkpointed run (``fields`` first), written to ``out/summary.json``."""
    summary = {
        "kind": kind, "steps": result.step, "start_step": start, "total_steps": total,
        "finished": result.step == total, "stopped_by": result.stopped_by, **fields,
        "final_metrics": result.final_metrics,
        "wall_time_s": result.wall_time_s, "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "out": str(out),
        "final_dir": final and str(final), "hf_dir": hf_dir and str(hf_dir),
    }
    write_summary(out, summary)
    return summary
