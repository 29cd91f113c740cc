"""How a run stops early: SIGTERM (what TPU/GCE preemption, Slurm and Kubernetes send before
they kill a job) makes the loop checkpoint at the next step boundary, and the command exit with
:data:`PREEMPTED_EXIT`; a failed write ends in one line naming the path and the cause.

    with StopSignal() as stop:           # catches SIGTERM while the loop runs
        for step in ...:
            if stop.requested(step - 1):  # at every step boundary, on every process
                ...save step - 1 and leave

Single process: a Python SIGTERM handler only sets a flag (the step in flight finishes; a
second SIGTERM changes nothing; SIGKILL cannot be caught, which is what the atomic checkpoints
are for). Several processes (``jax.distributed``): JAX's preemption service catches SIGTERM in
each process and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` makes
them all stop after the same step, as the checkpoint save is collective.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np

from jaxalign.checkpoint import os_error_of

__all__ = ["PREEMPTED_EXIT", "StopSignal", "io_error_message"]

# 128 + SIGTERM: the status a shell, Slurm (``sacct`` ExitCode 143) and Kubernetes ("exit code
# 143", terminated by SIGTERM) already report for a job stopped by SIGTERM, so requeue rules
# written for it (a Job's podFailurePolicy onExitCodes, ``[ $? -eq 143 ] && scontrol requeue``)
# apply unchanged; distinct from 0 (done), 1 (a crash) and 2 (bad input).
PREEMPTED_EXIT = 128 + signal.SIGTERM


class StopSignal:
    """Catches SIGTERM between ``__enter__`` and ``__exit__``; :meth:`requested` says, at a step
    boundary, whether to checkpoint and stop there. The previous handler is put back on exit.
    Outside the main thread (where Python cannot install handlers) it never requests a stop."""

    def __init__(self) -> None:
        self.received: str | None = None  # the signal's name once one arrived
        self._previous: Any = None
        self._installed = False
        self._jax_sync = jax.process_count() > 1  # JAX's preemption service, until it fails

    def __enter__(self) -> StopSignal:
        if not self._jax_sync:
            self._install()
        return self

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            print(f"jaxalign: {signal.Signals(signum).name} received: saving a checkpoint after"
                  " the step in flight, then stopping", file=sys.stderr, flush=True)
        self.received = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        """Whether to checkpoint ``step`` (the last one done) and stop. Every process calls it
        at every step boundary (in a multi-process run the answer is agreed collectively)."""
        if self._jax_sync:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            try:
                stop = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off: agree on our own flags
                self._jax_sync = False
                self._install()
            else:
                if stop:
                    self.received = self.received or "SIGTERM"
                return stop
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            flags = multihost_utils.process_allgather(np.int32(self.received is not None))
            self.received = self.received or ("SIGTERM" if np.any(flags) else None)
        return self.received is not None

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def io_error_message(error: BaseException, out: Any = None) -> str | None:
    """One line for an error that carries an errno (an ``OSError``; TensorStore's or Rust's
    errors say ``os_error_code='28'`` / ``os error 28``): ``"PATH: cause"``, with ``out`` (the
    run directory) standing in when the error names no path. None for any other error."""
    found = os_error_of(error)
    if found is None:
        return None
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or found[1]}"
    where = f" (writing under {out})" if out is not None else ""
    return f"{found[1]}{where}"
