"""``jaxalign sft|rm|dpo|ipo|orpo|ppo|grpo|rs|label|plan``: train, label and fine-tune from JSONL files,
and plan a pod job.

    jaxalign sft --data sft.jsonl --out runs/sft --model small --steps 500
    jaxalign rm  --data prefs.jsonl --out runs/rm --init-from runs/sft
    jaxalign dpo --data prefs.jsonl --out runs/dpo --init-from runs/sft --beta 0.1 --precompute-ref
    jaxalign dpo --data prefs.jsonl --out runs/rpo --loss dpo,sft --loss-weights 1,0.5
    jaxalign kto --data unpaired.jsonl --out runs/kto --init-from runs/sft   # {prompt, completion, label}
    jaxalign dpo --config runs/dpo.yaml --steps 1000          # file values, flags win
    jaxalign dpo --out runs/dpo --data prefs.jsonl --resume   # continue from the last checkpoint
    jaxalign ppo --prompts p.jsonl --policy runs/sft --reward runs/rm --out runs/ppo --mesh data=4
    jaxalign grpo --prompts math.jsonl --policy runs/sft --reward-fn jaxalign.rewards:math_answer --answer-column answer --out runs/grpo
    jaxalign rs --prompts p.jsonl --policy runs/sft --reward runs/rm --n 8 --rounds 3 --out runs/rs
    jaxalign label --judge runs/sft --pairs pairs.jsonl --constitution cai.yaml --out labels.jsonl
    jaxalign plan dpo --model llama-3-8b --mesh fsdp=8 --dtype bfloat16 --remat full --json

Every option is a field of the command's config dataclass in :mod:`jaxalign.cli.configs`
(:class:`~jaxalign.cli.configs.TrainConfig` for the five training commands; ``PPOConfig``,
``RSConfig``, ``LabelConfig``), or of a library config they embed (``OptimizerConfig``,
``RLHFConfig``).
Values come from its defaults, then the ``--config`` file (YAML read with ``yaml.safe_load``, or
JSON; keys are field names, ``-`` or ``_``), then the flags actually given on the command line.
Unknown keys are an error naming the key. Nothing is ever unpickled.

The same run from Python, without argparse: ``run_training("dpo", {"data": ..., "out": ...})``
returns the summary dict. The runs themselves (:func:`jaxalign.cli.train.train`,
:func:`jaxalign.cli.ppo.ppo`, :func:`jaxalign.cli.rs.rs`, :func:`jaxalign.cli.label.label`) are
imported only when a run starts (``--help`` does not load Orbax or TensorBoard).

Exit status: 0 done; 2 bad data (``file:line: reason`` on stderr), bad options or config file,
a checkpoint that does not fit the model (the message names the field), or a file that cannot
be written (``--out`` naming a file, a full disk: one line naming the path and the cause; the
checkpoints written before stay readable); 143 stopped by SIGTERM (TPU/GCE preemption, Slurm,
Kubernetes): the training commands and ``ppo`` checkpoint the last step done and exit, and
``--resume`` continues exactly. 143 is 128 + SIGTERM, the status a shell, Slurm and Kubernetes
already report for a job ended by SIGTERM, so requeue rules written for that (a Job's
``podFailurePolicy`` on exit code 143, ``[ $? -eq 143 ] && scontrol requeue $SLURM_JOB_ID``)
apply as they are; it differs from 1, which an unexpected error (a traceback) gives.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from jaxalign.cli.configs import (GRPOConfig, LabelConfig, PlanConfig, PPOConfig, RSConfig,
                                  TrainConfig)
from jaxalign.cli.options import ConfigError, add_options, build, checked, load_config_file

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
    "kto": "KTO (or --loss bco) on unpaired {prompt, completion, label} records",
}
COMMANDS = {
    **TRAIN_COMMANDS,
    "ppo": "RLHF with PPO (or GRPO/RLOO) against a reward model, on {prompt} records",
    "grpo": "GRPO (and Dr. GRPO, RLOO, DAPO's options) with verifiable Python rewards"
            " (--reward-fn) or a reward model, on {prompt, ...} records",
    "rs": "rejection-sampling fine-tuning: best-of-n of every prompt under a reward model, then"
          " SFT on the best, in rounds",
    "label": "label response pairs with a judge model (AI feedback) into soft preference JSONL",
    "plan": "compile a step for a simulated mesh (no weights allocated): per-device memory,"
            " FLOPs, collectives, and whether it fits TPU/GPU chips",
}
_CONFIGS = {**{command: TrainConfig for command in TRAIN_COMMANDS}, "ppo": PPOConfig,
            "grpo": GRPOConfig, "rs": RSConfig, "label": LabelConfig, "plan": PlanConfig}


def config_class(command: str) -> type:
    """The config dataclass of ``command`` (:class:`TrainConfig` for the training commands)."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    return _CONFIGS[command]


def make_config(values: Mapping[str, Any] | Any = None, *, command: str = "sft") -> Any:
    """The config of ``command`` (default: a :class:`TrainConfig`) from a mapping (keys with
    ``-`` or ``_``); unknown keys are errors. A config dataclass instance is returned as is."""
    cls = config_class(command)
    if isinstance(values, cls):
        return values
    return build(cls, checked(cls, values or {}))


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
    return command, build(cls, values)


def _run(command: str, config: Any) -> dict[str, Any]:
    """Imports the run of ``command`` (here, so that ``--help`` loads none of them) and runs it."""
    if command in TRAIN_COMMANDS:
        from jaxalign.cli.train import train  # noqa: PLC0415

        return train(command, config)
    if command in ("ppo", "grpo"):
        from jaxalign.cli.ppo import ppo  # noqa: PLC0415

        return ppo(config)
    if command == "rs":
        from jaxalign.cli.rs import rs  # noqa: PLC0415

        return rs(config)
    if command == "plan":
        from jaxalign.cli.plan import plan  # noqa: PLC0415

        return plan(config)
    from jaxalign.cli.label import label  # noqa: PLC0415

    return label(config)


def run_training(kind: str, config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Runs command ``kind`` (sft, rm, dpo, ipo, orpo, ppo, rs, label) as the CLI would; returns
    the summary dict.

    ``config`` is the command's config dataclass or a mapping of its fields (the options marked
    required are). Raises ``DataError``, :class:`ConfigError`, ``CheckpointMismatchError`` or
    ``jaxalign.cli.loop.RunError`` instead of exiting.
    """
    return _run(kind, make_config(config, command=kind))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jaxalign`` console script; returns the exit status (see the module docstring)."""
    try:
        command, config = parse_args(argv)
    except ConfigError as error:
        print(f"jaxalign: error: {error}", file=sys.stderr)
        return 2
    from jaxalign.checkpoint import CheckpointMismatchError  # noqa: PLC0415
    from jaxalign.data import DataError  # noqa: PLC0415
    from jaxalign.cli.exits import PREEMPTED_EXIT, io_error_message  # noqa: PLC0415
    from jaxalign.cli.loop import RunError  # noqa: PLC0415

    try:
        summary = run_training(command, config)
    except DataError as error:
        print(error, file=sys.stderr)  # already "file:line: reason"
        return 2
    except (ConfigError, CheckpointMismatchError, RunError) as error:
        print(f"jaxalign {command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk, an unwritable path: the path and the cause
        message = io_error_message(error, getattr(config, "out", None))
        if message is None:
            raise
        print(f"jaxalign {command}: error: {message}", file=sys.stderr)
        return 2
    if isinstance(summary, dict) and summary.get("stopped_by"):
        print(f"jaxalign {command}: stopped by {summary['stopped_by']} after step"
              f" {summary['steps']}/{summary['total_steps']}; continue with --resume (exit"
              f" status {PREEMPTED_EXIT})", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
