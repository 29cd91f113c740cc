"""``jaxalign sft|rm|dpo|ipo|orpo``: train from a JSONL file, log, checkpoint, resume, export.

    jaxalign sft --data sft.jsonl --out runs/sft --model small --steps 500
    jaxalign rm  --data prefs.jsonl --out runs/rm --init-from runs/sft
    jaxalign dpo --data prefs.jsonl --out runs/dpo --init-from runs/sft --beta 0.1 --precompute-ref
    jaxalign dpo --config runs/dpo.yaml --steps 1000          # file values, flags win
    jaxalign dpo --out runs/dpo --data prefs.jsonl --resume   # continue from the last checkpoint

Every option is a field of :class:`TrainConfig`. Values come from its defaults, then the
``--config`` file (YAML read with ``yaml.safe_load``, or JSON; keys are field names, ``-`` or
``_``), then the flags actually given on the command line. Unknown keys are an error naming the
key. Nothing is ever unpickled.

The same run from Python, without argparse: ``run_training("dpo", {"data": ..., "out": ...})``
returns the summary dict. The run itself is :func:`jaxalign.runner.train`, imported only when a
run starts (``--help`` does not load Orbax, Flax or TensorBoard).

Exit status: 0 done; 2 bad data (``file:line: reason`` on stderr), bad options or config file,
or a checkpoint that does not fit the model (the message names the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = [
    "COMMANDS", "ConfigError", "TrainConfig", "build_parser", "load_config_file", "main",
    "make_config", "parse_args", "run_training",
]

COMMANDS = {
    "sft": "supervised fine-tuning on {prompt, completion} records",
    "rm": "reward model (Bradley-Terry) on {prompt, chosen, rejected} pairs or rankings",
    "dpo": "direct preference optimisation on {prompt, chosen, rejected}",
    "ipo": "identity preference optimisation on {prompt, chosen, rejected}",
    "orpo": "odds-ratio preference optimisation (no reference model) on {prompt, chosen, rejected}",
}
_ALL = tuple(COMMANDS)


class ConfigError(ValueError):
    """A bad option value, config file or config key (the message names it)."""


def _opt(default: Any, help: str, *, type: Any = str, commands: tuple[str, ...] = _ALL,
         choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    metadata = {"help": help, "type": type, "commands": commands, "choices": choices,
                "metavar": metavar}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_REF = ("dpo", "ipo")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (the CLI's options, the file's keys)."""

    data: str | None = _opt(None, "JSONL training data (required)", metavar="FILE.jsonl")
    out: str | None = _opt(None, "run directory (required): metrics.jsonl, tb/, checkpoints/,"
                           " final/, hf/", metavar="DIR")
    model: str = _opt("tiny", "preset name (tiny, small, bench; random init) or a local Hugging"
                      " Face model directory", metavar="PRESET_OR_HF_DIR")
    model_overrides: dict = _opt({}, "JSON object of TransformerConfig fields applied to the"
                                 " preset, e.g. '{\"n_layers\": 1}'", type=dict, metavar="JSON")
    tokenizer: str | None = _opt(None, "tokenizer.json or a directory holding one (default: the"
                                 " model's, or a byte-level BPE trained on --data and saved in"
                                 " DIR/tokenizer)", metavar="PATH")
    init_from: str | None = _opt(None, "start from the final params of an earlier jaxalign run"
                                 " (its DIR or DIR/final); rm puts a fresh score head on an"
                                 " LM's trunk", metavar="DIR")
    steps: int = _opt(100, "training steps (batches); the LR schedule spans them", type=int)
    stop_at: int | None = _opt(None, "stop after this step with a checkpoint, as if interrupted"
                               " (continue with --resume)", type=int)
    batch_size: int = _opt(8, "records per batch (pairs for rm/dpo/ipo/orpo)", type=int)
    lr: float = _opt(1e-4, "peak learning rate (AdamW)", type=float)
    warmup_steps: int = _opt(0, "linear warmup updates before the cosine decay", type=int)
    end_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of --lr", type=float)
    weight_decay: float = _opt(0.0, "decoupled weight decay", type=float)
    max_grad_norm: float = _opt(1.0, "global-norm gradient clip (<= 0: none)", type=float)
    grad_accum_steps: int = _opt(1, "batches averaged per optimiser update", type=int)
    beta: float = _opt(0.1, "DPO/IPO temperature beta", type=float, commands=_REF)
    label_smoothing: float = _opt(0.0, "conservative DPO label smoothing in [0, 0.5)", type=float,
                                  commands=("dpo",))
    lam: float = _opt(0.1, "ORPO odds-ratio weight lambda", type=float, commands=("orpo",))
    center_coef: float = _opt(0.0, "reward centring coefficient (mean (r_c + r_r)^2)",
                              type=float, commands=("rm",))
    include_prompt: bool = _opt(False, "also train on prompt tokens", type=bool,
                                commands=("sft",))
    precompute_ref: bool = _opt(False, "compute reference log-probs once over the data before"
                                " training (no reference params kept)", type=bool, commands=_REF)
    max_length: int | None = _opt(None, "longest sequence, prompt + completion (default: the"
                                  " model's max_len)", type=int)
    max_prompt_length: int | None = _opt(None, "prompts keep their last this many tokens",
                                         type=int)
    pad_multiple: int = _opt(64, "batches are padded to a multiple of this (few shapes, few"
                             " compilations)", type=int)
    seed: int = _opt(0, "seed of init, shuffling and the state's PRNG key", type=int)
    save_every: int = _opt(500, "checkpoint every N steps (and at the end)", type=int)
    keep: int = _opt(3, "checkpoints kept", type=int)
    log_every: int = _opt(10, "log metrics every N steps (and at steps 1 and --steps)", type=int)
    resume: bool = _opt(False, "continue from the latest checkpoint in DIR/checkpoints", type=bool)
    on_bad_record: str = _opt("error", "a bad JSONL record stops the run (error, exit 2) or is"
                              " skipped and counted (skip)", choices=("error", "skip"))
    export_hf: bool = _opt(False, "also save the final model as HF safetensors in DIR/hf",
                           type=bool)
    progress: bool = _opt(True, "tqdm progress bar (off: a log line per logged step)", type=bool)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum_steps", "pad_multiple", "save_every",
                    "keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("stop_at", "max_length", "max_prompt_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be non-negative, got {self.warmup_steps}")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


    def optimizer_options(self) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer`` (the schedule spans the
        optimiser updates: ``steps / grad_accum_steps``)."""
        return {"learning_rate": self.lr, "total_steps": -(-self.steps // self.grad_accum_steps),
                "warmup_steps": self.warmup_steps, "end_lr_ratio": self.end_lr_ratio,
                "weight_decay": self.weight_decay, "grad_accum_steps": self.grad_accum_steps,
                "max_grad_norm": self.max_grad_norm if self.max_grad_norm > 0 else None}

    def step_options(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of the ``make_X_step`` factory of command ``kind``."""
        return {"sft": {"include_prompt": self.include_prompt},
                "rm": {"center_coef": self.center_coef},
                "dpo": {"beta": self.beta, "label_smoothing": self.label_smoothing},
                "ipo": {"beta": self.beta},
                "orpo": {"lam": self.lam}}[kind]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping (or a JSON object string)"}


def _coerce(name: str, value: Any) -> Any:
    """A config-file value checked (and converted, e.g. YAML's string '1e-3') to the field type."""
    field = _FIELDS[name]
    kind = field.metadata["type"]
    if value is None and field.default is None:
        return None
    if kind is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind is dict and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config key '{name}': invalid JSON ({error.msg})") from None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[kind]
    if not ok and kind is float and isinstance(value, str):
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"config key '{name}' must be {_TYPE_NAMES[kind]}, got {value!r}")
    if field.metadata["choices"] and value not in field.metadata["choices"]:
        raise ConfigError(f"config key '{name}' must be one of {field.metadata['choices']},"
                          f" got {value!r}")
    return float(value) if kind is float else value


def _checked(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keys normalised to field names (``-`` -> ``_``) and values checked against field types."""
    checked = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(_FIELDS))})")
        checked[name] = _coerce(name, value)
    return checked


def make_config(values: Mapping[str, Any] | TrainConfig | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping (keys with ``-`` or ``_``); unknown keys are errors."""
    if isinstance(values, TrainConfig):
        return values
    return TrainConfig(**_checked(values or {}))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML (``yaml.safe_load``) or JSON config file into a dict (keys not yet checked)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    meta = field.metadata
    flag = "--" + field.name.replace("_", "-")
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    shown = json.dumps(default) if isinstance(default, dict) else default
    help_text = meta["help"]
    if "default:" not in help_text and "(required)" not in help_text:
        help_text += f" (default: {shown})"
    # SUPPRESS: only flags actually given appear in the namespace, so they can win over the file.
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if meta["type"] is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _json_object if meta["type"] is dict else meta["type"]
        kwargs["metavar"] = meta["metavar"] or {int: "N", float: "X"}.get(meta["type"], "VALUE")
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
            kwargs.pop("metavar")
    parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxalign`` parser: one subcommand per training kind, each with its options."""
    parser = argparse.ArgumentParser(
        prog="jaxalign", description="Align language models in pure JAX: SFT, reward models,"
        " DPO, IPO, ORPO. See 'jaxalign COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, summary in COMMANDS.items():
        p = sub.add_parser(command, help=summary, description=f"jaxalign {command}: {summary}."
                           " Options come from the defaults, then --config, then the flags given.")
        p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                       help="YAML or JSON file of options (keys are option names); flags given"
                       " on the command line win (default: none)")
        for field in dataclasses.fields(TrainConfig):
            if command in field.metadata["commands"]:
                _add_option(p, field)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, TrainConfig]:
    """``(command, config)`` from command-line arguments, merged over ``--config`` if given.

    argparse errors exit with status 2 (``SystemExit``); a bad config raises :class:`ConfigError`.
    """
    given = vars(build_parser().parse_args(argv))
    command = given.pop("command")
    values = _checked(load_config_file(given.pop("config"))) if "config" in given else {}
    values.update(given)  # flags win
    return command, TrainConfig(**values)


def run_training(kind: str, config: Mapping[str, Any] | TrainConfig) -> dict[str, Any]:
    """Trains ``kind`` (sft, rm, dpo, ipo, orpo) as the CLI would; returns the summary dict.

    ``config`` is a :class:`TrainConfig` or a mapping of its fields (``data`` and ``out`` are
    required). Raises ``DataError``, :class:`ConfigError`, ``CheckpointMismatchError`` or
    ``jaxalign.runner.RunError`` instead of exiting.
    """
    if kind not in COMMANDS:
        raise ConfigError(f"unknown command {kind!r}; choose one of {', '.join(COMMANDS)}")
    from jaxalign import runner  # noqa: PLC0415  (keeps `jaxalign --help` light)

    return runner.train(kind, make_config(config))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jaxalign`` console script; returns the exit status (see the module docstring)."""
    try:
        command, config = parse_args(argv)
    except ConfigError as error:
        print(f"jaxalign: error: {error}", file=sys.stderr)
        return 2
    from jaxalign import runner  # noqa: PLC0415
    from jaxalign.checkpoint import CheckpointMismatchError  # noqa: PLC0415
    from jaxalign.data import DataError  # noqa: PLC0415

    try:
        runner.train(command, config)
    except DataError as error:
        print(error, file=sys.stderr)  # already "file:line: reason"
        return 2
    except (ConfigError, CheckpointMismatchError, runner.RunError) as error:
        print(f"jaxalign {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
