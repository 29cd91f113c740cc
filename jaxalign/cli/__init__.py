"""``jaxalign sft|rm|dpo|ipo|orpo|ppo|rs|label``: train, label and fine-tune from JSONL files.

    jaxalign sft --data sft.jsonl --out runs/sft --model small --steps 500
    jaxalign rm  --data prefs.jsonl --out runs/rm --init-from runs/sft
    jaxalign dpo --data prefs.jsonl --out runs/dpo --init-from runs/sft --beta 0.1 --precompute-ref
    jaxalign dpo --config runs/dpo.yaml --steps 1000          # file values, flags win
    jaxalign dpo --out runs/dpo --data prefs.jsonl --resume   # continue from the last checkpoint
    jaxalign ppo --prompts p.jsonl --policy runs/sft --reward runs/rm --out runs/ppo --mesh data=4
    jaxalign rs --prompts p.jsonl --policy runs/sft --reward runs/rm --n 8 --rounds 3 --out runs/rs
    jaxalign label --judge runs/sft --pairs pairs.jsonl --constitution cai.yaml --out labels.jsonl

Every option is a field of the command's config dataclass (:class:`TrainConfig` for the five
training commands; :class:`~jaxalign.rl_options.PPOConfig`, ``RSConfig``, ``LabelConfig``).
Values come from its defaults, then the ``--config`` file (YAML read with ``yaml.safe_load``, or
JSON; keys are field names, ``-`` or ``_``), then the flags actually given on the command line.
Unknown keys are an error naming the key. Nothing is ever unpickled.

The same run from Python, without argparse: ``run_training("dpo", {"data": ..., "out": ...})``
returns the summary dict. The runs themselves (:func:`jaxalign.runner.train`,
:func:`jaxalign.run_ppo.ppo`, :func:`jaxalign.run_rs.rs`, :func:`jaxalign.run_label.label`) are
imported only when a run starts (``--help`` does not load Orbax, Flax or TensorBoard).

Exit status: 0 done; 2 bad data (``file:line: reason`` on stderr), bad options or config file,
or a checkpoint that does not fit the model (the message names the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from jaxalign.options import (
    ConfigError, OptimizerOptions, add_options, checked, load_config_file, option,
)
from jaxalign.rl_options import LabelConfig, PPOConfig, RSConfig

__all__ = [
    "COMMANDS", "ConfigError", "TRAIN_COMMANDS", "TrainConfig", "build_parser", "config_class",
    "load_config_file", "main", "make_config", "parse_args", "run_training",
]

TRAIN_COMMANDS = {
    "sft": "supervised fine-tuning on {prompt, completion} records",
    "rm": "reward model (Bradley-Terry) on {prompt, chosen, rejected} pairs or rankings",
    "dpo": "direct preference optimisation on {prompt, chosen, rejected}",
    "ipo": "identity preference optimisation on {prompt, chosen, rejected}",
    "orpo": "odds-ratio preference optimisation (no reference model) on {prompt, chosen, rejected}",
}
COMMANDS = {
    **TRAIN_COMMANDS,
    "ppo": "RLHF with PPO (or GRPO/RLOO) against a reward model, on {prompt} records",
    "rs": "rejection-sampling fine-tuning: best-of-n of every prompt under a reward model, then"
          " SFT on the best, in rounds",
    "label": "label response pairs with a judge model (AI feedback) into soft preference JSONL",
}
# command -> (config class, "module:function" of its run, imported when the run starts)
_RUNS = {
    **{command: (None, "jaxalign.runner:train") for command in TRAIN_COMMANDS},
    "ppo": (PPOConfig, "jaxalign.run_ppo:ppo"),
    "rs": (RSConfig, "jaxalign.run_rs:rs"),
    "label": (LabelConfig, "jaxalign.run_label:label"),
}


_REF = ("dpo", "ipo")


@dataclasses.dataclass(frozen=True)
class TrainConfig(OptimizerOptions):
    """Everything one training run depends on (the CLI's options, the file's keys)."""

    data: str | None = option(None, "JSONL training data (required)", metavar="FILE.jsonl")
    out: str | None = option(None, "run directory (required): metrics.jsonl, tb/, checkpoints/,"
                           " final/, hf/", metavar="DIR")
    model: str = option("tiny", "preset name (tiny, small, bench; random init) or a local Hugging"
                      " Face model directory", metavar="PRESET_OR_HF_DIR")
    model_overrides: dict = option({}, "JSON object of TransformerConfig fields applied to the"
                                 " preset, e.g. '{\"n_layers\": 1}'", type=dict, metavar="JSON")
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
    grad_accum_steps: int = option(1, "batches averaged per optimiser update", type=int)
    beta: float = option(0.1, "DPO/IPO temperature beta", type=float, commands=_REF)
    label_smoothing: float = option(0.0, "conservative DPO label smoothing in [0, 0.5)", type=float,
                                  commands=("dpo",))
    lam: float = option(0.1, "ORPO odds-ratio weight lambda", type=float, commands=("orpo",))
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
    seed: int = option(0, "seed of init, shuffling and the state's PRNG key", type=int)
    save_every: int = option(500, "checkpoint every N steps (and at the end)", type=int)
    keep: int = option(3, "checkpoints kept", type=int)
    log_every: int = option(10, "log metrics every N steps (and at steps 1 and --steps)", type=int)
    resume: bool = option(False, "continue from the latest checkpoint in DIR/checkpoints", type=bool)
    on_bad_record: str = option("error", "a bad JSONL record stops the run (error, exit 2) or is"
                              " skipped and counted (skip)", choices=("error", "skip"))
    export_hf: bool = option(False, "also save the final model as HF safetensors in DIR/hf",
                           type=bool)
    progress: bool = option(True, "tqdm progress bar (off: a log line per logged step)", type=bool)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("steps", "batch_size", "grad_accum_steps", "pad_multiple", "save_every",
                    "keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("stop_at", "max_length", "max_prompt_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def optimizer_options(self) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer`` (the schedule spans the
        optimiser updates: ``steps / grad_accum_steps``)."""
        updates = -(-self.steps // self.grad_accum_steps)
        return {**self.schedule_options(self.lr, updates),
                "grad_accum_steps": self.grad_accum_steps}

    def step_options(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of the ``make_X_step`` factory of command ``kind``."""
        return {"sft": {"include_prompt": self.include_prompt},
                "rm": {"center_coef": self.center_coef},
                "dpo": {"beta": self.beta, "label_smoothing": self.label_smoothing},
                "ipo": {"beta": self.beta},
                "orpo": {"lam": self.lam}}[kind]


def config_class(command: str) -> type:
    """The config dataclass of ``command`` (:class:`TrainConfig` for the training commands)."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    return _RUNS[command][0] or TrainConfig


def make_config(values: Mapping[str, Any] | Any = None, *, command: str = "sft") -> Any:
    """The config of ``command`` (default: a :class:`TrainConfig`) from a mapping (keys with
    ``-`` or ``_``); unknown keys are errors. A config dataclass instance is returned as is."""
    cls = config_class(command)
    if isinstance(values, cls):
        return values
    return cls(**checked(cls, values or {}))


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxalign`` parser: one subcommand per command, each with its options."""
    parser = argparse.ArgumentParser(
        prog="jaxalign", description="Align language models in pure JAX: SFT, reward models,"
        " DPO, IPO, ORPO, PPO, rejection sampling, AI-feedback labelling. See"
        " 'jaxalign COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, summary in COMMANDS.items():
        p = sub.add_parser(command, help=summary, description=f"jaxalign {command}: {summary}."
                           " Options come from the defaults, then --config, then the flags given.")
        p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                       help="YAML or JSON file of options (keys are option names); flags given"
                       " on the command line win (default: none)")
        add_options(p, config_class(command), command)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, Any]:
    """``(command, config)`` from command-line arguments, merged over ``--config`` if given.

    argparse errors exit with status 2 (``SystemExit``); a bad config raises :class:`ConfigError`.
    """
    given = vars(build_parser().parse_args(argv))
    command = given.pop("command")
    cls = config_class(command)
    values = checked(cls, load_config_file(given.pop("config"))) if "config" in given else {}
    values.update(given)  # flags win
    return command, cls(**values)


def _run_function(command: str) -> Any:
    module, name = _RUNS[command][1].split(":")
    return getattr(importlib.import_module(module), name)


def run_training(kind: str, config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Runs command ``kind`` (sft, rm, dpo, ipo, orpo, ppo, rs, label) as the CLI would; returns
    the summary dict.

    ``config`` is the command's config dataclass or a mapping of its fields (the options marked
    required are). Raises ``DataError``, :class:`ConfigError`, ``CheckpointMismatchError`` or
    ``jaxalign.runner.RunError`` instead of exiting.
    """
    config = make_config(config, command=kind)
    run = _run_function(kind)
    return run(kind, config) if kind in TRAIN_COMMANDS else run(config)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jaxalign`` console script; returns the exit status (see the module docstring)."""
    try:
        command, config = parse_args(argv)
    except ConfigError as error:
        print(f"jaxalign: error: {error}", file=sys.stderr)
        return 2
    from jaxalign.checkpoint import CheckpointMismatchError  # noqa: PLC0415
    from jaxalign.data import DataError  # noqa: PLC0415
    from jaxalign.run_loop import RunError  # noqa: PLC0415

    try:
        run_training(command, config)
    except DataError as error:
        print(error, file=sys.stderr)  # already "file:line: reason"
        return 2
    except (ConfigError, CheckpointMismatchError, RunError) as error:
        print(f"jaxalign {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
