"""The run behind ``jaxalign label``: AI-feedback preference labels from a judge model
(:func:`jaxalign.feedback.label_pairs`), written as standard preference JSONL.

Input (``--pairs``), one JSON object per line, blank lines ignored, extra fields ignored::

    {"prompt": str, "response_a": str, "response_b": str}     pairs to label
    {"prompt": str, "chosen": str, "rejected": str}           an existing preference file,
                                                              relabelled (the order is unused)

Output (``--out``): ``{"prompt", "chosen", "rejected", "p_chosen"}`` per pair, the likelier-better
response as ``chosen`` and ``p_chosen = max(P, 1 − P)`` in ``[0.5, 1]``, which ``jaxalign rm``
(soft Bradley–Terry) and ``dpo`` (conservative DPO) read; pairs of identical responses carry no
preference and are left out. A causal-LM judge reads the constitution and judges each pair in
both orders (position bias cancels: swapping the responses gives ``1 − P``); a reward-model judge
gives ``σ(r_a − r_b)``. Bad records: ``file:line: reason`` (``DataError``), or skipped and
counted (``--on-bad-record skip``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxalign import feedback
from jaxalign.data import BadRecord, DataError, read_records
from jaxalign.models import RewardModel, load_hf
from jaxalign.cli.configs import LabelConfig
from jaxalign.cli.loop import RunError
from jaxalign.cli.run_dir import load_final
from jaxalign.cli.sources import find_tokenizer, is_run_dir, load_tokenizer

__all__ = ["label", "read_pairs"]

_STYLES = (("response_a", "response_b"), ("chosen", "rejected"))


def _pair(record: Any) -> tuple[str, str, str]:
    """``(prompt, a, b)`` of one decoded record; raises ``BadRecord`` with the reason."""
    if not isinstance(record, dict):
        raise BadRecord(f"record must be a JSON object, got {type(record).__name__}")
    styles = [names for names in _STYLES if any(name in record for name in names)]
    if len(styles) != 1:
        raise BadRecord("expected 'response_a' and 'response_b', or 'chosen' and 'rejected'"
                        + (" (not both)" if styles else ""))
    values = []
    for name in ("prompt", *styles[0]):
        if name not in record:
            raise BadRecord(f"missing field '{name}'")
        if not isinstance(record[name], str) or not record[name].strip():
            raise BadRecord(f"field '{name}' must be a non-empty string")
        values.append(record[name])
    return values[0], values[1], values[2]


def read_pairs(path: str, *, on_bad_record: str = "error") -> tuple[list[tuple[str, str, str]],
                                                                     list[str]]:
    """``(pairs, skipped)``: every ``(prompt, a, b)`` of a pairs JSONL and the
    ``file:line: reason`` of each skipped record (``on_bad_record="error"`` raises
    ``DataError`` on the first instead)."""
    pairs, skipped = read_records(path, _pair, on_bad_record=on_bad_record)
    if not pairs:
        raise DataError(f"{path}: no usable records ({len(skipped)} skipped)")
    return pairs, skipped


def _judge(config: LabelConfig) -> tuple[Any, Any]:
    """``(model, params)`` of ``--judge``."""
    if is_run_dir(config.judge):
        model, params, _ = load_final(config.judge)
        return model, params
    if os.path.isdir(config.judge):
        try:
            return load_hf(config.judge)
        except (OSError, ValueError, KeyError) as error:
            raise RunError(f"--judge {config.judge}: cannot load a Hugging Face model:"
                           f" {error}") from None
    raise RunError(f"--judge {config.judge}: neither a finished jaxalign run (with"
                   " final/config.json) nor a Hugging Face model directory")


def label(config: LabelConfig) -> dict[str, Any]:
    """Labels ``--pairs`` with ``--judge`` into ``--out``; returns a summary."""
    if config.judge is None or config.pairs is None or config.out is None:
        raise RunError("--judge, --pairs and --out are required (as flags or in --config)")
    if not os.path.isfile(config.pairs):
        raise RunError(f"--pairs {config.pairs}: no such file")
    model, params = _judge(config)
    tokenizer = load_tokenizer(find_tokenizer(config.tokenizer, config.judge))
    is_reward_model = isinstance(model, RewardModel)
    constitution = feedback.DEFAULT_CONSTITUTION
    try:
        if config.constitution is not None:
            constitution = feedback.load_constitution(config.constitution)
        if not is_reward_model:
            feedback.option_token_ids(tokenizer)
    except OSError as error:
        raise RunError(f"--constitution {config.constitution}: {error.strerror}") from None
    except (ValueError, yaml.YAMLError) as error:
        raise RunError(str(error)) from None
    if config.max_length > model.config.max_len:
        raise RunError(f"--max-length {config.max_length} exceeds the judge's"
                       f" max_len={model.config.max_len}")
    pairs, skipped = read_pairs(config.pairs, on_bad_record=config.on_bad_record)
    for reason in skipped[:5]:
        print(f"skipped {reason}", file=sys.stderr)

    prompts, responses_a, responses_b = (list(column) for column in zip(*pairs))
    p_a = feedback.label_pairs(model, params, tokenizer, prompts, responses_a, responses_b,
                               constitution, max_length=config.max_length,
                               batch_size=config.batch_size)
    records = feedback.preference_records(prompts, responses_a, responses_b, p_a)
    Path(config.out).absolute().parent.mkdir(parents=True, exist_ok=True)
    feedback.write_jsonl(config.out, records)
    p_chosen = np.asarray([r["p_chosen"] for r in records])
    summary = {"kind": "label", "pairs": len(pairs), "written": len(records),
               "identical": len(pairs) - len(records), "skipped": len(skipped),
               "judge": "reward_model" if is_reward_model else "causal_lm",
               "principles": 0 if is_reward_model else len(constitution),
               "mean_p_chosen": float(p_chosen.mean()) if len(records) else None,
               "out": str(config.out)}
    judge = ("a reward model" if is_reward_model
             else f"a causal LM, {len(constitution)} principle(s), both orders")
    mean = "n/a" if summary["mean_p_chosen"] is None else f"{summary['mean_p_chosen']:.3f}"
    print(f"jaxalign label: {len(pairs)} pairs judged by {judge}; {len(records)} written"
          f" ({summary['identical']} identical, {len(skipped)} skipped), mean p_chosen {mean}"
          f" -> {config.out}")
    return summary
