"""Training state, and the one way a step is built and compiled.

A :class:`TrainState` is a pytree (params, optimiser state, step, PRNG key, and optionally frozen
reference params), so it can be jitted over, donated, sharded and checkpointed as one object.
:func:`make_loss_step` turns a loss into ``step(state, batch) -> (state, metrics)``;
:func:`compile_step` jits every step (this one and the RLHF iteration) with the state donated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxalign import sharding as shd
from jaxalign.train.optim import nonfinite_count

@flax.struct.dataclass
class TrainState:
    """Everything one training step reads and writes.

    Attributes:
      params: trainable parameters (a pytree).
      opt_state: optax state for ``params``.
      step: ``[]`` int32, number of optimiser steps taken (micro-steps under accumulation).
      key: a typed PRNG key, split inside steps that need randomness.
      ref_params: reference parameters (DPO-family losses with in-step reference log-probs),
        or ``None``; frozen unless the step moves them (TR-DPO).
      loss_state: state a loss carries across steps (BCO's running reward baseline), or
        ``None``.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    ref_params: Any = None
    loss_state: Any = None


def create_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    ref_params: Any = None,
    loss_state: Any = None,
) -> TrainState:
    """A fresh :class:`TrainState` at step 0 with ``optimizer.init(params)``.

    Steps donate the state, so the arrays in ``params`` are consumed by the first step: pass a
    copy (``jax.tree.map(jnp.copy, params)``) if you still need them. ``ref_params`` is always
    copied, so it may be the same tree as ``params``.
    """
    if ref_params is not None:
        ref_params = jax.tree.map(jnp.copy, ref_params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
        ref_params=ref_params,
        loss_state=loss_state,
    )


#: Folded into ``state.key`` for the training forward passes' dropout masks (LoRA dropout).
DROPOUT_STREAM = 0x64726F70


def train_dropout_key(state: TrainState) -> jax.Array:
    """The dropout key of this step's training forward pass: ``fold_in(fold_in(key, stream),
    step)``, a function of the state alone (a replayed step draws the same masks, the next
    step new ones; ``state.key`` itself is left as it is)."""
    return jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT_STREAM), state.step)


def apply_gradients(
    state: TrainState,
    grads: Any,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update; returns the new state and ``grad_norm`` / ``skipped`` metrics.

    With ``axis_name`` (inside ``pmap``/``shard_map``) the gradients are first averaged over
    that axis with ``lax.pmean``, so every replica applies the same update.
    """
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        "skipped_updates": nonfinite_count(opt_state),
    }
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


@functools.cache  # find_library runs ldconfig; look it up once per process
def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where there is none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_compiler_memory() -> None:
    """Hand the heap memory XLA's compiler freed back to the OS (glibc ``malloc_trim(0)``;
    a no-op elsewhere). Compiling a step peaks at hundreds of MB that glibc otherwise keeps
    in the process's resident set for good (the one-jit RLHF step at vocabulary 32k: 455 of
    623 MB came back)."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class CompiledStep:
    """``step(state, *args) -> outputs``: ``jax.jit`` of a step function with the state donated
    (its buffers are reused for the new state), the one way every jaxalign step compiles.

    Without a mesh the step follows its inputs' placement. With one, it is compiled on the
    first call with ``in_shardings``/``out_shardings``: the state's from
    ``state_shardings(state)`` (see :func:`jaxalign.sharding.state_shardings`), each further
    argument's and output's from ``args``/``outputs`` (``"batch"``: leading axis split over
    ``data × fsdp``; ``"replicated"``). ``bound`` arguments are appended to every call,
    placed once (replicated on the mesh): arrays a step needs that are not in its state, passed
    as inputs rather than compiled in as constants (``.bound``, placed). ``.jitted`` is the
    jitted function: ``jitted(state, *args, *bound)``.
    """

    def __init__(self, fn: Callable[..., Any], *, mesh: Mesh | None = None,
                 state_shardings: Callable[[Any], Any] | None = None,
                 args: tuple[str, ...] = ("batch",), outputs: tuple[str, ...] = ("replicated",),
                 bound: tuple[Any, ...] = ()):
        if mesh is not None and state_shardings is None:
            raise ValueError("a step compiled for a mesh needs state_shardings")
        self._fn, self._mesh, self._state_shardings = fn, mesh, state_shardings
        self._args, self._outputs = args, outputs
        self.jitted = jax.jit(fn, donate_argnums=(0,)) if mesh is None else None
        if mesh is not None and jax.process_count() > 1:
            bound = jax.device_get(bound)  # through the host, as in sharding.shard_state
        self.bound = jax.device_put(bound, None if mesh is None else shd.replicated(mesh))

    def _sharding(self, kind: str) -> NamedSharding:
        if kind not in ("batch", "replicated"):
            raise ValueError(f"a step argument is 'batch' or 'replicated', got {kind!r}")
        return (shd.batch_sharding if kind == "batch" else shd.replicated)(self._mesh)

    def _jit(self, state: Any) -> Any:
        if self.jitted is None:
            state_sh = self._state_shardings(state)
            in_sh = (state_sh, *map(self._sharding, self._args))
            in_sh += (shd.replicated(self._mesh),) * len(self.bound)
            self.jitted = jax.jit(self._fn, donate_argnums=(0,), in_shardings=in_sh,
                                  out_shardings=(state_sh, *map(self._sharding, self._outputs)))
        return self.jitted

    def __call__(self, state: Any, *args: Any) -> Any:
        jitted = self._jit(state)
        compiled_before = _cache_size(jitted)
        outputs = jitted(state, *args, *self.bound)
        if _cache_size(jitted) != compiled_before:  # this call compiled: return its scratch
            release_compiler_memory()
        return outputs

    def lower(self, state: Any, *args: Any) -> Any:
        """``jitted.lower(state, *args, *bound)``, without running the step: ``state`` and
        ``args`` may be trees of ``jax.ShapeDtypeStruct`` (no array allocated), so the program
        a call would run can be compiled and its memory and FLOPs read (``jaxalign plan``)."""
        return self._jit(state).lower(state, *args, *self.bound)


def _cache_size(jitted: Any) -> int:
    """How many programs ``jitted`` has compiled (-1 when jax does not say)."""
    size = getattr(jitted, "_cache_size", None)
    return size() if callable(size) else -1


def compile_step(fn: Callable[..., Any], **options: Any) -> CompiledStep:
    """:class:`CompiledStep` ``(fn, **options)``: jitted with the state donated, and with
    in/out shardings on a ``mesh``."""
    return CompiledStep(fn, **options)


def make_loss_step(
    loss_fn: Callable[[Any, TrainState, dict], tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    jit: bool = True,
    prepare: Callable[[TrainState, dict], tuple[TrainState, dict]] | None = None,
    after_update: Callable[[TrainState], TrainState] | None = None,
    mesh: Mesh | None = None,
    model: Any = None,
    carries_loss_state: bool = False,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The step every factory builds: differentiate ``loss_fn(params, state, batch) ->
    (loss, metrics)``, apply the optimiser, and return ``(state, {"loss", **metrics,
    "grad_norm", "skipped_updates"})``. ``prepare(state, batch) -> (state, batch)`` runs first,
    outside the differentiated function (e.g. reference log-probs, which do not depend on
    ``params``, or a loss's running statistics);
    ``after_update(state)`` runs on the updated state (e.g. moving a reference model). With
    ``carries_loss_state``, ``loss_fn`` returns ``(loss, (metrics, loss_state))`` and the new
    ``loss_state`` (statistics it updated from the same forward pass) goes into the state.

    Jitted with the state donated, unless ``axis_name`` is given (gradients and metrics are then
    ``pmean``-ed over it and the caller wraps the step in ``pmap``/``shard_map``) or ``jit`` is
    false. With a ``mesh`` it is compiled with in/out shardings: ``params`` and ``ref_params``
    laid out by ``model``'s logical axes, the optimiser state like the params (see
    :func:`train_state_shardings`), batches split over ``data × fsdp``.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if prepare is not None:
            state, batch = prepare(state, batch)
        (loss, aux), grads = jax.value_and_grad(
            lambda params: loss_fn(params, state, batch), has_aux=True)(state.params)
        metrics = aux
        if carries_loss_state:
            metrics, loss_state = aux
            state = state.replace(loss_state=loss_state)
        state, opt_metrics = apply_gradients(state, grads, optimizer, axis_name=axis_name)
        if after_update is not None:
            state = after_update(state)
        if axis_name is not None:
            loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
        return state, {"loss": loss, **metrics, **opt_metrics}

    if axis_name is not None or not jit:
        return step
    if mesh is None:
        return compile_step(step)
    return compile_step(step, mesh=mesh,
                        state_shardings=lambda state: train_state_shardings(state, mesh, model))


def train_state_shardings(state: TrainState, mesh: Mesh, model: Any) -> TrainState:
    """NamedShardings of a :class:`TrainState`: ``params`` and ``ref_params`` by ``model``'s
    logical axes, ``opt_state`` like ``params``, the rest replicated."""
    return shd.state_shardings(state, mesh, {"params": model, "ref_params": model})


def create_sharded_train_state(
    make_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    mesh: Mesh,
    model: Any,
    params_key: jax.Array,
    with_reference: bool = False,
    loss_state: Any = None,
) -> TrainState:
    """A fresh :class:`TrainState` created directly on ``mesh``: ``make_params(params_key)``,
    the reference copy and the optimiser state are computed under one ``jax.jit`` whose
    ``out_shardings`` are :func:`train_state_shardings`, so no device ever holds more than its
    shard (a preset's random init never exists unsharded).

    ``make_params`` is traced; a :class:`jax.tree_util.Partial` carrying arrays (a loaded
    checkpoint, already placed sharded) passes them as inputs, not compiled-in constants.
    """
    if not isinstance(make_params, jax.tree_util.Partial):
        make_params = jax.tree_util.Partial(make_params)

    def init(make_params, params_key, key):
        params = make_params(params_key)
        return create_train_state(params, optimizer, key,
                                  ref_params=params if with_reference else None,
                                  loss_state=loss_state)

    shardings = train_state_shardings(jax.eval_shape(init, make_params, params_key, key), mesh,
                                      model)
    return jax.jit(init, out_shardings=shardings)(
        make_params, shd.global_key(params_key, mesh), shd.global_key(key, mesh))
