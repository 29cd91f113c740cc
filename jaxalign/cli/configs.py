"""Options of ``jaxalign ppo``, ``jaxalign rs`` and ``jaxalign label`` (see :mod:`jaxalign.cli`).

Names follow TRL/OpenRLHF where they exist, and :class:`jaxalign.rlhf.RLHFConfig` field for
field. Like :class:`jaxalign.cli.TrainConfig`, each field is a flag and a config-file key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.options import ConfigError, OptimizerOptions, option

__all__ = ["LabelConfig", "PPOConfig", "RSConfig"]

_RLHF_FIELDS = (  # PPOConfig fields that are RLHFConfig fields of the same name
    "max_new_tokens", "temperature", "top_k", "top_p", "kl_coef", "kl_target", "kl_horizon",
    "kl_estimator", "missing_eos_penalty", "whiten_rewards", "score_clip", "advantage",
    "samples_per_prompt", "gamma", "lam", "whiten_advantages", "ppo_epochs", "num_minibatches",
    "clip_eps", "value_clip", "vf_coef", "ent_coef", "shared_value_head")


def _check(config: Any, positive: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Raises unless the ``positive`` (and non-None ``optional``) fields are at least 1 and every
    field with choices holds one of them."""
    for name in positive + optional:
        value = getattr(config, name)
        if (value is not None or name not in optional) and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for field in dataclasses.fields(config):
        choices = field.metadata["choices"]
        if choices and getattr(config, field.name) not in choices:
            raise ConfigError(f"{field.name} must be one of {choices},"
                              f" got {getattr(config, field.name)!r}")


@dataclasses.dataclass(frozen=True)
class _PolicyRunConfig(OptimizerOptions):
    """What ``ppo`` and ``rs`` share: a policy sampling prompts, a reward model scoring them."""

    prompts: str | None = option(None, "JSONL of {\"prompt\"} records (required); other fields"
                                 " are ignored, so a preference file serves",
                                 metavar="FILE.jsonl")
    policy: str | None = option(None, "the policy to start from (required): an earlier jaxalign"
                                " run (DIR or DIR/final, e.g. an sft run), a Hugging Face model"
                                " directory, or a preset (random init)", metavar="DIR_OR_PRESET")
    reward: str | None = option(None, "a jaxalign rm run that scores prompt + completion"
                                " (required)", metavar="DIR")
    out: str | None = option(None, "run directory (required): metrics.jsonl, tb/, final/, hf/"
                             " (ppo: also checkpoints/)", metavar="DIR")
    tokenizer: str | None = option(None, "tokenizer.json or a directory holding one (default:"
                                   " the policy's; for a preset policy the reward run's)",
                                   metavar="PATH")
    model_overrides: dict = option({}, "JSON object of TransformerConfig fields applied to a"
                                   " preset --policy", type=dict, metavar="JSON")
    max_new_tokens: int = option(32, "tokens sampled per completion", type=int)
    temperature: float = option(1.0, "sampling temperature", type=float)
    lr: float = option(1e-5, "peak learning rate (AdamW) of the policy", type=float)
    max_prompt_length: int | None = option(None, "prompts keep their last this many tokens"
                                           " (default: the model's max_len - --max-new-tokens)",
                                           type=int)
    pad_multiple: int = option(64, "prompt batches are padded to a multiple of this (few"
                               " shapes, few compilations)", type=int)
    seed: int = option(0, "seed of the prompt order, sampling and new parameters", type=int)
    on_bad_record: str = option("error", "a bad JSONL record stops the run (error, exit 2) or"
                                " is skipped and counted (skip)", choices=("error", "skip"))
    export_hf: bool = option(False, "also save the final policy as HF safetensors in DIR/hf",
                             type=bool)
    progress: bool = option(True, "tqdm progress bar (off: a log line per logged step)",
                            type=bool)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, ("max_new_tokens", "pad_multiple"), ("max_prompt_length",))

    def optimizer_options(self, total_updates: int, lr: float | None = None) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer`` for ``total_updates`` updates."""
        return self.schedule_options(self.lr if lr is None else lr, total_updates)


@dataclasses.dataclass(frozen=True)
class PPOConfig(_PolicyRunConfig):
    """Everything one ``jaxalign ppo`` run depends on (RLHF knobs as in :class:`RLHFConfig`)."""

    mesh: str | None = option(None, "device mesh AXIS=N,... over data, fsdp, tensor, e.g."
                              " data=4,fsdp=2; data left out takes the devices the others leave"
                              " (default: one device)", metavar="SPEC")
    steps: int = option(100, "RLHF iterations (sample, score, PPO update); the LR schedule spans"
                        " them", type=int)
    stop_at: int | None = option(None, "stop after this iteration with a checkpoint, as if"
                                 " interrupted (continue with --resume)", type=int)
    batch_size: int = option(8, "prompts per iteration", type=int)
    value_lr: float | None = option(None, "learning rate of the separate value model (default:"
                                    " --lr)", type=float)
    top_k: int = option(0, "sample from the k likeliest tokens (0: all)", type=int)
    top_p: float = option(1.0, "nucleus sampling mass", type=float)
    kl_coef: float = option(0.05, "KL penalty coefficient beta (the initial one if adaptive)",
                            type=float)
    kl_target: float | None = option(None, "adapt beta towards this sequence KL (none: beta"
                                     " stays fixed)", type=float)
    kl_horizon: float = option(10_000.0, "horizon of the adaptive KL controller", type=float)
    kl_estimator: str = option("k1", "per-token KL estimator", choices=("k1", "k3", "abs"))
    missing_eos_penalty: float | None = option(None, "subtracted from the score of completions"
                                               " without EOS (none: no penalty)", type=float)
    whiten_rewards: bool = option(False, "whiten per-token rewards (GAE only)", type=bool)
    score_clip: float | None = option(None, "clip reward-model scores to [-X, X] (none: no"
                                      " clip)", type=float)
    advantage: str = option("gae", "advantage estimator: GAE with a value model, or the"
                            " critic-free GRPO / RLOO (--samples-per-prompt >= 2)",
                            choices=("gae", "grpo", "rloo"))
    samples_per_prompt: int = option(1, "completions sampled per prompt", type=int)
    gamma: float = option(1.0, "discount", type=float)
    lam: float = option(0.95, "GAE lambda", type=float)
    whiten_advantages: bool = option(True, "whiten advantages (not with grpo)", type=bool)
    ppo_epochs: int = option(2, "passes over each rollout batch", type=int)
    num_minibatches: int = option(2, "minibatches per pass", type=int)
    clip_eps: float = option(0.2, "PPO ratio clip epsilon", type=float)
    value_clip: float | None = option(0.2, "value clip range (none: unclipped)", type=float,
                                      nullable=True)
    vf_coef: float = option(0.1, "value loss coefficient", type=float)
    ent_coef: float = option(0.0, "entropy bonus coefficient", type=float)
    shared_value_head: bool = option(False, "the value is a head on the policy's trunk (no"
                                     " separate value model; GAE only)", type=bool)
    save_every: int = option(100, "checkpoint every N iterations (and at the end)", type=int)
    keep: int = option(3, "checkpoints kept", type=int)
    log_every: int = option(1, "log metrics every N iterations (and at 1 and --steps)",
                            type=int)
    resume: bool = option(False, "continue from the latest checkpoint in DIR/checkpoints",
                          type=bool)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, ("steps", "batch_size", "samples_per_prompt", "ppo_epochs",
                               "num_minibatches", "save_every", "keep", "log_every"),
                        ("stop_at",))

    def rlhf_config(self, *, eos_id: int | None, pad_id: int) -> Any:
        """The :class:`jaxalign.rlhf.RLHFConfig` of these options (``ConfigError`` if invalid)."""
        from jaxalign.rlhf import RLHFConfig  # noqa: PLC0415  (imports JAX)

        try:
            return RLHFConfig(eos_id=eos_id, pad_id=pad_id,
                              **{name: getattr(self, name) for name in _RLHF_FIELDS})
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class RSConfig(_PolicyRunConfig):
    """Everything one ``jaxalign rs`` (rejection-sampling fine-tuning) run depends on."""

    n: int = option(8, "completions sampled per prompt; the best-scoring one is kept", type=int)
    rounds: int = option(3, "rounds of best-of-n sampling followed by fine-tuning", type=int)
    steps_per_round: int = option(10, "SFT steps per round on the kept completions", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, ("n", "rounds", "steps_per_round"))


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Everything one ``jaxalign label`` run depends on."""

    judge: str | None = option(None, "the judge (required): a jaxalign run (DIR or DIR/final)"
                               " holding a causal LM (constitutional judging) or a reward model"
                               " (sigmoid of the reward difference), or a Hugging Face model"
                               " directory", metavar="DIR")
    pairs: str | None = option(None, "JSONL of {\"prompt\", \"response_a\", \"response_b\"} or"
                               " {\"prompt\", \"chosen\", \"rejected\"} records, plain strings"
                               " (required)", metavar="FILE.jsonl")
    out: str | None = option(None, "output preference JSONL {\"prompt\", \"chosen\","
                             " \"rejected\", \"p_chosen\"} (required)", metavar="FILE.jsonl")
    constitution: str | None = option(None, "YAML/JSON list of principles, or {principles:"
                                      " [...]}; the labels are averaged over them (default: one"
                                      " helpful-honest-harmless principle; unused by a reward"
                                      " model)", metavar="FILE")
    tokenizer: str | None = option(None, "tokenizer.json or a directory holding one (default:"
                                   " the judge's)", metavar="PATH")
    batch_size: int = option(16, "judge forward-pass batch", type=int)
    max_length: int = option(256, "judge inputs keep their last this many tokens", type=int)
    on_bad_record: str = option("error", "a bad JSONL record stops the run (error, exit 2) or"
                                " is skipped and counted (skip)", choices=("error", "skip"))

    def __post_init__(self) -> None:
        _check(self, ("batch_size", "max_length"))
