"""What a run logs: ``metrics.jsonl``, TensorBoard scalars and a tqdm bar (:class:`RunLog`).

A line is written and flushed per logged step. Resuming from step ``k`` cuts ``metrics.jsonl``
back to the lines of steps ``<= k`` by writing a new file beside it and renaming it over the
old one, so a crash at that moment loses no line. A failed write (a full disk) raises an
``OSError`` naming the file; so does TensorBoard's background writer, whose thread would
otherwise die with a traceback and leave a second one for interpreter exit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

__all__ = ["RunLog", "naming_path"]


@contextlib.contextmanager
def naming_path(path: Path) -> Iterator[None]:
    """Adds ``path`` to an ``OSError`` that names no file (a failed ``write``: a full disk)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


# ------------------------------------------------------------------------------ tensorboard
_TB_FAILURES: dict[threading.Thread, BaseException] = {}
_previous_hook = threading.excepthook


def _keep_tensorboard_failures(args: threading.ExceptHookArgs) -> None:
    """tensorboardX writes events in a thread that dies on an ``OSError``; keep the error for
    :meth:`RunLog.log` to raise (naming ``tb/``) instead of printing its traceback."""
    if (args.thread is not None and type(args.thread).__name__ == "_EventLoggerThread"
            and isinstance(args.exc_value, OSError)):
        _TB_FAILURES[args.thread] = args.exc_value
        return
    _previous_hook(args)


def _install_hook() -> None:
    global _previous_hook
    if threading.excepthook is not _keep_tensorboard_failures:
        _previous_hook = threading.excepthook
        threading.excepthook = _keep_tensorboard_failures


def _event_writer(writer: SummaryWriter) -> Any:
    return getattr(getattr(writer, "file_writer", None), "event_writer", None)


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
        self.path, self.tb_dir = out / "metrics.jsonl", out / "tb"
        if enabled:
            with naming_path(self.path):
                _keep_lines_to(self.path, start)
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (see close())
            _install_hook()
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=start + 1 if start else None)
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

    def _raise_tensorboard_failure(self) -> None:
        worker = getattr(_event_writer(self.writer), "_worker", None)
        error = _TB_FAILURES.pop(worker, None) if worker is not None else None
        if error is not None:
            raise OSError(error.errno, error.strerror, str(self.tb_dir)) from error

    def log(self, step: int, metrics: dict[str, Any], extra: dict[str, float]) -> dict[str, float]:
        """Writes ``{"step", **metrics, **extra}`` (metrics on the host) and updates the bar."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **extra}
        now, tokens = time.perf_counter(), self.tokens
        rate = (tokens - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
        self.last_log = (now, tokens)
        self.first_log = self.first_log or self.last_log
        if not self.enabled:
            return record
        with naming_path(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self._raise_tensorboard_failure()
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
        """Flushes and closes everything; raises an ``OSError`` naming ``tb/`` if TensorBoard's
        last events could not be written (a failure of ``metrics.jsonl`` was raised by
        :meth:`log` already)."""
        self.bar.close()
        if not self.enabled:
            return
        with contextlib.suppress(OSError):
            self.file.close()
        event_writer = _event_writer(self.writer)
        worker = getattr(event_writer, "_worker", None)
        try:
            self.writer.close()
        except OSError as error:
            if event_writer is not None:  # or tensorboardX retries at exit, with a traceback
                event_writer._closed = True  # noqa: SLF001
            _TB_FAILURES.pop(worker, None)
            raise OSError(error.errno, error.strerror, str(self.tb_dir)) from error
        _TB_FAILURES.pop(worker, None)


def _keep_lines_to(path: Path, start: int) -> None:
    """Cuts ``metrics.jsonl`` back to the lines of steps ``<= start`` (what a crashed run logged
    after its checkpoint goes; a fresh run, ``start == 0``, empties it). Written beside and
    renamed over it, so a crash here leaves the old file whole."""
    kept = []
    if start and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if _logged_step(line) <= start]
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", encoding="utf-8") as file:
        file.write("".join(line + "\n" for line in kept))
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn or foreign line (so it is dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
