"""Options of ``jaxalign ppo``, ``jaxalign rs`` and ``jaxalign label`` (see :mod:`jaxalign.cli`).

Names follow TRL/OpenRLHF where they exist, and :class:`jaxalign.train.rlhf.RLHFConfig` field for
field. Like :class:`jaxalign.cli.TrainConfig`, each field is a flag and a config-file key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.cli.options import ConfigError, embed, option
from jaxalign.data import PackingConfig
from jaxalign.models.config import ComputeConfig
from jaxalign.models.lora import LoraConfig
from jaxalign.train.optim import OptimizerConfig
from jaxalign.train.preference import PreferenceConfig
from jaxalign.train import rlhf_config
from jaxalign.train.rlhf_config import RLHFConfig

__all__ = ["PACKING_COMMANDS", "PLAN_STEPS", "PREFERENCE_COMMANDS", "GRPOConfig", "LabelConfig", "PPOConfig",
           "PlanConfig",
           "RSConfig", "TrainConfig"]


def _check(config: Any, positive: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Raises unless the ``positive`` (and non-None ``optional``) fields are at least 1 and every
    field with choices holds one of them."""
    for name in positive + optional:
        value = getattr(config, name)
        if (value is not None or name not in optional) and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        if choices and getattr(config, field.name) not in choices:
            raise ConfigError(f"{field.name} must be one of {choices},"
                              f" got {getattr(config, field.name)!r}")


_REF = ("dpo", "ipo")
_LORA_COMMANDS = ("sft", "rm", "dpo", "ipo", "orpo")  # and ppo / grpo
_EXPORT_ADAPTER = ("also save the final LoRA adapters in PEFT's format (adapter_config.json,"
                   " adapter_model.safetensors) in DIR/adapter; --export-hf merges them")
PREFERENCE_COMMANDS = ("dpo", "ipo", "orpo", "kto")  # the commands of PreferenceConfig
PACKING_COMMANDS = ("sft", "dpo", "ipo", "orpo")  # --packing sequences (sft) / pairs (the rest)


def _mesh_option() -> Any:
    """The ``--mesh`` option (one definition for every command that takes it)."""
    return option(None, "device mesh AXIS=N,... over data, fsdp, tensor, e.g. data=4,fsdp=2;"
                  " data left out takes the devices the others leave (default: one device, or"
                  " every device data-parallel in a multi-process run)", metavar="SPEC")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (the CLI's options, the file's keys)."""

    data: str | None = option(None, "JSONL training data (required)", metavar="FILE.jsonl")
    out: str | None = option(None, "run directory (required): metrics.jsonl, tb/, checkpoints/,"
                           " final/, hf/", metavar="DIR")
    model: str = option("tiny", "preset name (tiny, small, bench; random init) or a local Hugging"
                      " Face model directory", metavar="PRESET_OR_HF_DIR")
    model_overrides: dict = option({}, "JSON object of TransformerConfig fields applied to the"
                                 " preset, e.g. '{\"n_layers\": 1}' (an HF model or --init-from"
                                 " run: fields that keep its weights, e.g. max_len)", type=dict,
                                 metavar="JSON")
    compute: ComputeConfig = embed(ComputeConfig, after="model_overrides")
    lora: LoraConfig = embed(LoraConfig, after="model_overrides", commands=_LORA_COMMANDS)
    mesh: str | None = _mesh_option()
    tokenizer: str | None = option(None, "tokenizer.json or a directory holding one (default: the"
                                 " model's, or a byte-level BPE trained on --data and saved in"
                                 " DIR/tokenizer)", metavar="PATH")
    init_from: str | None = option(None, "start from the final params of an earlier jaxalign run"
                                 " (its DIR or DIR/final); rm puts a fresh score head on an"
                                 " LM's trunk", metavar="DIR")
    steps: int = option(100, "training steps (batches); the LR schedule spans them", type=int)
    stop_at: int | None = option(None, "stop after this step with a checkpoint, as if interrupted"
                               " (continue with --resume)", type=int)
    batch_size: int = option(8, "records per batch (pairs for rm/dpo/ipo/orpo)", type=int)
    lr: float = option(1e-4, "peak learning rate (AdamW)", type=float)
    optimizer: OptimizerConfig = embed(OptimizerConfig, after="lr")
    grad_accum_steps: int = option(1, "batches averaged per optimiser update", type=int)
    preference: PreferenceConfig = embed(PreferenceConfig, commands=PREFERENCE_COMMANDS)
    center_coef: float = option(0.0, "reward centring coefficient (mean (r_c + r_r)^2)",
                              type=float, commands=("rm",))
    include_prompt: bool = option(False, "also train on prompt tokens", type=bool,
                                commands=("sft",))
    precompute_ref: bool = option(False, "compute reference log-probs once over the data before"
                                " training (no reference params kept)", type=bool, commands=_REF)
    max_length: int | None = option(None, "longest sequence, prompt + completion (default: the"
                                  " model's max_len)", type=int)
    max_prompt_length: int | None = option(None, "prompts keep their last this many tokens",
                                         type=int)
    pad_multiple: int = option(64, "batches are padded to a multiple of this (few shapes, few"
                             " compilations)", type=int)
    pack: PackingConfig = embed(PackingConfig, after="pad_multiple", commands=PACKING_COMMANDS)
    seed: int = option(0, "seed of init, shuffling and the state's PRNG key", type=int)
    save_every: int = option(500, "checkpoint every N steps (and at the end)", type=int)
    keep: int = option(3, "checkpoints kept", type=int)
    log_every: int = option(10, "log metrics every N steps (and at steps 1 and --steps)", type=int)
    resume: bool = option(False, "continue from the latest checkpoint in DIR/checkpoints", type=bool)
    on_bad_record: str = option("error", "a bad JSONL record stops the run (error, exit 2) or is"
                              " skipped and counted (skip)", choices=("error", "skip"))
    export_hf: bool = option(False, "also save the final model as HF safetensors in DIR/hf",
                           type=bool)
    export_adapter: bool = option(False, _EXPORT_ADAPTER, type=bool, commands=_LORA_COMMANDS)
    progress: bool = option(True, "tqdm progress bar (off: a log line per logged step)", type=bool)

    def __post_init__(self) -> None:
        _check(self, ("steps", "batch_size", "grad_accum_steps", "pad_multiple", "save_every",
                      "keep", "log_every"), ("stop_at", "max_length", "max_prompt_length"))
        if self.precompute_ref and self.preference.ref_sync_every is not None:
            raise ConfigError("precompute_ref fixes the reference log-probs, but ref_sync_every"
                              f"={self.preference.ref_sync_every} moves the reference (TR-DPO):"
                              " choose one")
        if self.lora.enabled and self.preference.ref_sync_every is not None:
            raise ConfigError("ref_sync_every moves a reference copy of the weights (TR-DPO); a"
                              " LoRA run's reference is the base model with no copy: choose one")

    def optimizer_options(self) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer`` (the schedule spans the
        optimiser updates: ``steps / grad_accum_steps``)."""
        updates = -(-self.steps // self.grad_accum_steps)
        return {"learning_rate": self.lr, "total_steps": updates,
                **dataclasses.asdict(self.optimizer), "grad_accum_steps": self.grad_accum_steps,
                "master_weights": True}  # float32 master weights for bf16 params (f32: no-op)

    def preference_config(self, kind: str) -> PreferenceConfig:
        """The step's :class:`PreferenceConfig`: ``ipo``, ``orpo`` and ``kto`` are ``dpo`` with
        their own loss as the default ``--loss``."""
        if kind != "dpo" and self.preference.loss == PreferenceConfig.loss:
            return dataclasses.replace(self.preference, loss=(kind,))
        return self.preference

    def step_options(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of the ``make_X_step`` factory of command ``kind``."""
        if kind in PREFERENCE_COMMANDS:
            return {"config": self.preference_config(kind)}
        return {"sft": {"include_prompt": self.include_prompt},
                "rm": {"center_coef": self.center_coef}}[kind]


@dataclasses.dataclass(frozen=True)
class _PolicyRunConfig:
    """What ``ppo`` and ``rs`` share: a policy sampling prompts, a reward model scoring them."""

    prompts: str | None = option(None, "JSONL of {\"prompt\"} records (required); other fields"
                                 " are ignored, so a preference file serves",
                                 metavar="FILE.jsonl")
    policy: str | None = option(None, "the policy to start from (required): an earlier jaxalign"
                                " run (DIR or DIR/final, e.g. an sft run), a Hugging Face model"
                                " directory, or a preset (random init)", metavar="DIR_OR_PRESET")
    reward: str | None = option(None, "a jaxalign rm run that scores prompt + completion"
                                " (required); ppo and grpo take --reward-fn instead",
                                metavar="DIR")
    out: str | None = option(None, "run directory (required): metrics.jsonl, tb/, final/, hf/"
                             " (ppo: also checkpoints/)", metavar="DIR")
    tokenizer: str | None = option(None, "tokenizer.json or a directory holding one (default:"
                                   " the policy's; for a preset policy the reward run's)",
                                   metavar="PATH")
    model_overrides: dict = option({}, "JSON object of TransformerConfig fields applied to a"
                                   " preset --policy (an HF model or run: fields that keep its"
                                   " weights)", type=dict, metavar="JSON")
    compute: ComputeConfig = embed(ComputeConfig, after="model_overrides")
    lr: float = option(1e-5, "peak learning rate (AdamW) of the policy", type=float)
    optimizer: OptimizerConfig = embed(OptimizerConfig, after="lr")
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
        _check(self, ("pad_multiple",), ("max_prompt_length",))

    def optimizer_options(self, total_updates: int, lr: float | None = None) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer`` for ``total_updates`` updates."""
        return {"learning_rate": self.lr if lr is None else lr, "total_steps": total_updates,
                **dataclasses.asdict(self.optimizer), "master_weights": True}


@dataclasses.dataclass(frozen=True)
class PPOConfig(_PolicyRunConfig):
    """Everything one ``jaxalign ppo`` run depends on (RLHF knobs as in :class:`RLHFConfig`)."""

    mesh: str | None = _mesh_option()
    lora: LoraConfig = embed(LoraConfig, after="model_overrides")
    export_adapter: bool = option(False, _EXPORT_ADAPTER, type=bool)
    steps: int = option(100, "RLHF iterations (sample, score, PPO update); the LR schedule spans"
                        " them", type=int)
    stop_at: int | None = option(None, "stop after this iteration with a checkpoint, as if"
                                 " interrupted (continue with --resume)", type=int)
    batch_size: int = option(8, "prompts per iteration", type=int)
    value_lr: float | None = option(None, "learning rate of the separate value model (default:"
                                    " --lr)", type=float)
    reward_fn: list = option([], "a Python reward function on the decoded text instead of"
                             " --reward: MODULE:FUNCTION or MODULE:FACTORY(key=value, ...), e.g."
                             " jaxalign.rewards:math_answer; repeat the flag for several (the"
                             " score is their weighted sum; default: none)", type=list,
                             metavar="MODULE:FN")
    reward_weights: str | None = option(None, "comma-separated weight of each --reward-fn"
                                        " (default: 1 each)", metavar="W,W")
    answer_column: str | None = option(None, "the prompts' field with the reference answer,"
                                       " passed to the reward functions as 'answer' (required"
                                       " in every record; default: the fields as they are)",
                                       metavar="FIELD")
    rlhf: RLHFConfig = embed(RLHFConfig, exclude=("eos_id", "pad_id"))
    save_every: int = option(100, "checkpoint every N iterations (and at the end)", type=int)
    keep: int = option(3, "checkpoints kept", type=int)
    log_every: int = option(1, "log metrics every N iterations (and at 1 and --steps)",
                            type=int)
    resume: bool = option(False, "continue from the latest checkpoint in DIR/checkpoints",
                          type=bool)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, ("steps", "batch_size", "save_every", "keep", "log_every"), ("stop_at",))
        if self.reward is not None and self.reward_fn:
            raise ConfigError("pass --reward (a reward model) or --reward-fn, not both")
        if not self.reward_fn and (self.reward_weights is not None
                                   or self.answer_column is not None):
            raise ConfigError("--reward-weights and --answer-column go with --reward-fn")

    @property
    def max_new_tokens(self) -> int:
        return self.rlhf.max_new_tokens

    def rlhf_config(self, *, eos_id: int | tuple[int, ...] | None, pad_id: int) -> RLHFConfig:
        """The :class:`RLHFConfig` the run uses: ``rlhf`` with the tokenizer's EOS and pad ids."""
        return dataclasses.replace(self.rlhf, eos_id=eos_id, pad_id=pad_id)


@dataclasses.dataclass(frozen=True)
class GRPOConfig(PPOConfig):
    """Everything one ``jaxalign grpo`` run depends on: ``ppo``'s options with GRPO's defaults
    (:class:`jaxalign.train.rlhf_config.GRPOConfig`: group-normalised advantages over 8 samples
    per prompt, the KL in the loss with β = 0, one update per batch), usually scored by
    ``--reward-fn``."""

    rlhf: RLHFConfig = embed(rlhf_config.GRPOConfig, exclude=("eos_id", "pad_id"))


@dataclasses.dataclass(frozen=True)
class RSConfig(_PolicyRunConfig):
    """Everything one ``jaxalign rs`` (rejection-sampling fine-tuning) run depends on."""

    max_new_tokens: int = option(32, "tokens sampled per completion", type=int)
    temperature: float = option(1.0, "sampling temperature", type=float)
    n: int = option(8, "completions sampled per prompt; the best-scoring one is kept", type=int)
    rounds: int = option(3, "rounds of best-of-n sampling followed by fine-tuning", type=int)
    steps_per_round: int = option(10, "SFT steps per round on the kept completions", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, ("max_new_tokens", "n", "rounds", "steps_per_round"))


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


PLAN_STEPS = ("sft", "rm", "dpo", "ipo", "orpo", "ppo")  # the steps jaxalign plan compiles


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What ``jaxalign plan`` compiles: one step, a model shape, a mesh and the batch shapes (see
    :mod:`jaxalign.cli.plan`). The step's own settings are the training commands' (the
    optimiser's, ``ppo``'s RLHF knobs), under the same names."""

    step: str = option("dpo", "the step to plan: sft, rm, dpo, ipo, orpo, or ppo (the one-jit"
                       " RLHF iteration)", choices=PLAN_STEPS, positional=True)
    model: str = option("tiny", "model shape: llama-3-8b, qwen2.5-7b, a preset, a Hugging Face"
                        " model directory or its config.json (only the config is read), or a"
                        " JSON file of TransformerConfig fields", metavar="NAME_OR_PATH")
    model_overrides: dict = option({}, "JSON object of TransformerConfig fields applied to the"
                                   " shape", type=dict, metavar="JSON")
    compute: ComputeConfig = embed(ComputeConfig, after="model_overrides")
    scan_layers: bool = option(True, "compile the blocks as one scanned layer (compile time"
                               " stays flat in depth); train with the same setting", type=bool)
    mesh: str = option("data=1", "the mesh to simulate, AXIS=N,... over data, fsdp, tensor (as"
                       " --mesh of the training commands); its size is the number of simulated"
                       " CPU devices", metavar="SPEC")
    batch_size: int = option(8, "records per batch (pairs for rm/dpo/ipo/orpo, prompts for"
                             " ppo), split over data x fsdp", type=int)
    max_length: int | None = option(None, "tokens per sequence, prompt + completion (default:"
                                    " the model's max_len)", type=int)
    max_prompt_length: int | None = option(None, "ppo: prompt tokens (default: max_length -"
                                           " max_new_tokens)", type=int)
    grad_accum_steps: int = option(1, "batches averaged per optimiser update", type=int)
    precompute_ref: bool = option(False, "dpo/ipo: reference log-probs come with the batch (no"
                                  " reference params in the state)", type=bool)
    optimizer: OptimizerConfig = embed(OptimizerConfig, after="grad_accum_steps")
    rlhf: RLHFConfig = embed(RLHFConfig, exclude=("eos_id", "pad_id"))
    mfu: float = option(0.4, "model FLOPs utilisation assumed for the step-time column",
                        type=float)
    usable_fraction: float = option(0.9, "share of a chip's memory a step may fill (the"
                                    " runtime, its reservations and fragmentation take the"
                                    " rest)", type=float)
    json: bool = option(False, "print one JSON object instead of the tables", type=bool)

    def __post_init__(self) -> None:
        _check(self, ("batch_size", "grad_accum_steps"), ("max_length", "max_prompt_length"))
        if not (0 < self.mfu <= 1 and 0 < self.usable_fraction <= 1):
            raise ConfigError(f"mfu={self.mfu} and usable_fraction={self.usable_fraction} must"
                              " be in (0, 1]")

    def optimizer_options(self) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer``, as the training commands
        pass them (the learning rate and the schedule's length change no buffer: fixed)."""
        return {"learning_rate": 1e-5, "total_steps": 1000, **dataclasses.asdict(self.optimizer),
                "grad_accum_steps": self.grad_accum_steps, "master_weights": True}
