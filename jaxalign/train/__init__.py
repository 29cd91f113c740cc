"""Compiled training steps: ``make_X_step(...) -> step(state, batch) -> (state, metrics)``.

Every factory jits its step with the state donated. With ``axis_name="data"`` it instead returns
the plain step, which averages gradients and metrics with ``lax.pmean`` over that axis, for
``jax.pmap(step, axis_name="data")`` or ``shard_map`` data parallelism. Under ``jit`` with a
mesh no axis name is needed: XLA inserts the reductions.
"""

from jaxalign.train.preference import (
    PREFERENCE_LOSSES,
    make_preference_step,
    make_reference_logps_fn,
    pair_logps,
    preference_loss,
)
from jaxalign.train.reward import make_reward_step, ranking_pair_weights, reward_loss
from jaxalign.train.sft import make_sft_step, sft_loss
from jaxalign.train.state import (
    TrainState,
    apply_gradients,
    compile_step,
    create_train_state,
    learning_rate_schedule,
    optimizer_schedule,
    make_loss_step,
    make_optimizer,
    nonfinite_count,
)

__all__ = [
    "PREFERENCE_LOSSES",
    "TrainState",
    "apply_gradients",
    "compile_step",
    "create_train_state",
    "learning_rate_schedule",
    "optimizer_schedule",
    "make_loss_step",
    "make_optimizer",
    "make_preference_step",
    "make_reference_logps_fn",
    "make_reward_step",
    "make_sft_step",
    "nonfinite_count",
    "pair_logps",
    "preference_loss",
    "ranking_pair_weights",
    "reward_loss",
    "sft_loss",
]
