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
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from jaxalign.distributed import is_main_process
from jaxalign.checkpoint import CheckpointMismatchError, Checkpointer, config_mismatches
from jaxalign.cli.options import flat_values
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


def prepare_out(out: Path, *, resume: bool) -> bool:
    """Whether the run resumes from ``out/checkpoints``; raises if it holds checkpoints and
    ``resume`` is false (notes on stderr when ``resume`` finds none)."""
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
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        metadata = ckpt.read_metadata()
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
    state, metadata = ckpt.restore(state, config=model_config)
    try:
        loader.restore(metadata["loader"])
    except ValueError as error:
        raise RunError(f"cannot resume: {error}") from None
    old_args = metadata.get("args", {})
    changed = [f"{k}: {old_args.get(k)!r} -> {args[k]!r}" for k in trajectory_options
               if old_args.get(k) != args[k]]
    if changed and is_main_process():
        print(f"warning: resuming with changed options ({'; '.join(changed)}); the metrics"
              " will differ from an uninterrupted run", file=sys.stderr)
    return state, int(metadata["step"])


# ------------------------------------------------------------------------------ logging
class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar; measures tokens/s between log steps.

    ``headline`` is the metric shown on the bar (and in the log line without a bar). Token
    counts may be device scalars (e.g. generated tokens); they are read on logged steps only.
    With ``enabled=False`` (processes other than 0) nothing is written.
    """

    def __init__(self, out: Path, kind: str, *, total: int, start: int, progress: bool,
                 headline: str = "loss", enabled: bool = True) -> None:
        self.enabled, self.progress = enabled, progress and enabled
        self.total, self.headline = total, headline
        if enabled:
            path = out / "metrics.jsonl"
            kept = []
            if start and path.exists():  # drop what a crashed run logged after its checkpoint
                kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                        if _logged_step(line) <= start]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
            self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
        self.bar = tqdm(total=total, initial=start, desc=f"jaxalign {kind}", unit="step",
                        disable=not self.progress, dynamic_ncols=True, file=sys.stderr)
        self._tokens, self._pending = 0, []
        self.first_log: tuple[float, int] | None = None  # (time, tokens) after the first log
        self.last_log = (time.perf_counter(), 0)

    def add_tokens(self, count: Any) -> None:
        """Counts ``count`` more tokens (an int, or a device scalar read later)."""
        if isinstance(count, int):
            self._tokens += count
        else:
            self._pending.append(count)

    @property
    def tokens(self) -> int:
        """Tokens counted so far (reads pending device counts)."""
        if self._pending:
            self._tokens += int(round(sum(float(c) for c in jax.device_get(self._pending))))
            self._pending = []
        return self._tokens

    def log(self, step: int, metrics: dict[str, Any], extra: dict[str, float]) -> dict[str, float]:
        """Writes ``{"step", **metrics, **extra}`` (metrics on the host) and updates the bar."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **extra}
        now, tokens = time.perf_counter(), self.tokens
        rate = (tokens - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
        self.last_log = (now, tokens)
        self.first_log = self.first_log or self.last_log
        if not self.enabled:
            return record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.add_scalar("perf/tokens_per_s", rate, step)
        value = record[self.headline]
        if self.progress:
            short = self.headline.split("/")[0]
            self.bar.set_postfix({short: f"{value:.4f}", "tok_s": f"{rate:.0f}"}, refresh=False)
        else:
            print(f"step {step}/{self.total} {self.headline} {value:.4f} tokens/s {rate:.0f}",
                  file=sys.stderr)
        return record

    def steady_rate(self, started: float) -> float:
        """Tokens/s after the first logged step (which includes compilation) when possible."""
        now, tokens = time.perf_counter(), self.tokens
        begin_time, begin_tokens = self.first_log or (started, 0)
        if tokens == begin_tokens:
            begin_time, begin_tokens = started, 0
        return (tokens - begin_tokens) / max(now - begin_time, 1e-9)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.writer.close()
            self.file.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn or foreign line (so it is dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


# ------------------------------------------------------------------------------ the loop
class LoopResult(NamedTuple):
    state: Any
    step: int  # the last step done
    final_metrics: dict[str, float]  # of the last step ({} when no step ran)
    wall_time_s: float  # since ``began``: setup and compilation included
    tokens: int
    tokens_per_s: float  # after the first logged step when possible


def run_loop(state: Any, step_fn: Callable[[Any, int], tuple[Any, dict, Any]], *, start: int,
             end: int, total: int, out: Path, kind: str, ckpt: Checkpointer,
             checkpoint_metadata: Callable[[int], dict[str, Any]], log_every: int,
             save_every: int, progress: bool, began: float, headline: str = "loss",
             extra: Callable[[int], dict[str, float]] = lambda step: {}) -> LoopResult:
    """Steps ``start + 1 … end`` of a run of ``total`` steps: logs steps 1, every
    ``log_every``-th and ``total`` (``{"step", **metrics, **extra(step)}``), checkpoints every
    ``save_every``-th and the last one; closes ``ckpt`` (also on error)."""
    log = RunLog(out, kind, total=total, start=start, progress=progress, headline=headline,
                 enabled=is_main_process())
    started = time.perf_counter()
    metrics, step = None, start
    try:
        for step in range(start + 1, end + 1):
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
        ckpt.save(step, state, metadata=checkpoint_metadata(step))
    finally:
        log.close()
        ckpt.close()
    return LoopResult(state, step, final_metrics, wall_time, log.tokens, tokens_per_s)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``out/summary.json`` (process 0 only)."""
    if is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n",
                                          encoding="utf-8")


def checkpointed_loop(state: Any, step_fn: Callable[[Any, int], tuple[Any, dict, Any]], *,
                      config: Any, kind: str, out: Path, loader: DataLoader, resuming: bool,
                      model_config: dict[str, Any], trajectory_options: Iterable[str],
                      began: float, headline: str = "loss",
                      extra: Callable[[int], dict[str, float]] = lambda step: {}
                      ) -> tuple[LoopResult, int]:
    """The skeleton every checkpointed command shares: restore the latest checkpoint when
    ``resuming``, run :func:`run_loop` to ``--stop-at`` or ``--steps``, checkpoint with the
    loader's position and ``config``'s options as metadata. ``config`` has ``steps``,
    ``stop_at``, ``save_every``, ``keep``, ``log_every``, ``progress``. Returns the loop's
    result and the step it started from."""
    args = flat_values(config)
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
                      progress=config.progress, began=began, headline=headline, extra=extra)
    return result, start


def summarize(kind: str, result: LoopResult, *, start: int, total: int, out: Path,
              final: Path | None, hf_dir: Path | None, **fields: Any) -> dict[str, Any]:
    """The summary of a checkpointed run (``fields`` first), written to ``out/summary.json``."""
    summary = {
        "kind": kind, "steps": result.step, "start_step": start, "total_steps": total,
        "finished": result.step == total, **fields, "final_metrics": result.final_metrics,
        "wall_time_s": result.wall_time_s, "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "out": str(out),
        "final_dir": final and str(final), "hf_dir": hf_dir and str(hf_dir),
    }
    write_summary(out, summary)
    return summary
