"""Layer 2, compiled steps: ``make_X_step(...) -> step(state, batch) -> (state, metrics)``.

Every factory compiles its step through :func:`compile_step` (``jax.jit`` with the state
donated; with a mesh, in/out shardings from :func:`jaxalign.sharding.state_shardings`). With
``axis_name="data"`` a factory instead returns the plain step, which averages gradients and
metrics with ``lax.pmean`` over that axis, for ``jax.pmap(step, axis_name="data")`` or
``shard_map`` data parallelism. Under ``jit`` with a mesh no axis name is needed: XLA inserts
the reductions.

``sft``, ``reward`` and ``preference`` steps train on batches; :mod:`~jaxalign.train.rlhf` is
the whole RLHF iteration (sample, score, advantages, PPO epochs) as one compiled function;
:mod:`jaxalign.train.best_of_n` samples n and keeps the best under a
:mod:`~jaxalign.train.scorers` scorer (its functions are used through the module, whose name
they share).
"""

from jaxalign.train.lora import lora_optimizer, trainable_opt_state
from jaxalign.train.optim import (
    MasterWeightsState,
    OptimizerConfig,
    float32_master_weights,
    learning_rate_schedule,
    make_optimizer,
    nonfinite_count,
    optimizer_schedule,
)
from jaxalign.train.preference import (
    PREFERENCE_LOSSES,
    UNPAIRED_LOSSES,
    PairLogps,
    PreferenceConfig,
    make_preference_step,
    make_reference_logps_fn,
    pair_logps,
    preference_loss,
    reference_logps,
)
from jaxalign.train.reward import make_reward_step, ranking_pair_weights, reward_loss
from jaxalign.train.rlhf import (
    RLHFState,
    init_rlhf_state,
    kl_controller,
    make_rlhf_step,
    rlhf_state_models,
    shard_rlhf_state,
)
from jaxalign.train.rlhf_config import ADVANTAGE_ESTIMATORS, GRPOConfig, RLHFConfig
from jaxalign.train.scorers import completion_scorer, reward_model_scorer
from jaxalign.train.sft import make_sft_step, sft_loss
from jaxalign.train.unpaired import (
    completion_logps,
    init_loss_state,
    make_unpaired_step,
    unpaired_loss,
)
from jaxalign.train.state import (
    CompiledStep,
    TrainState,
    apply_gradients,
    compile_step,
    create_sharded_train_state,
    create_train_state,
    make_loss_step,
    train_state_shardings,
)

__all__ = [
    "trainable_opt_state",
    "ADVANTAGE_ESTIMATORS",
    "CompiledStep",
    "GRPOConfig",
    "MasterWeightsState",
    "OptimizerConfig",
    "PREFERENCE_LOSSES",
    "PairLogps",
    "PreferenceConfig",
    "RLHFConfig",
    "RLHFState",
    "TrainState",
    "UNPAIRED_LOSSES",
    "apply_gradients",
    "compile_step",
    "completion_logps",
    "completion_scorer",
    "create_sharded_train_state",
    "create_train_state",
    "float32_master_weights",
    "init_loss_state",
    "init_rlhf_state",
    "kl_controller",
    "learning_rate_schedule",
    "make_loss_step",
    "lora_optimizer",
    "make_optimizer",
    "make_preference_step",
    "make_reference_logps_fn",
    "make_reward_step",
    "make_rlhf_step",
    "make_sft_step",
    "make_unpaired_step",
    "nonfinite_count",
    "optimizer_schedule",
    "pair_logps",
    "preference_loss",
    "ranking_pair_weights",
    "reference_logps",
    "reward_loss",
    "reward_model_scorer",
    "rlhf_state_models",
    "shard_rlhf_state",
    "sft_loss",
    "train_state_shardings",
    "unpaired_loss",
]
