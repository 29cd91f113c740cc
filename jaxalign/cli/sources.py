"""What ``jaxalign ppo`` and ``jaxalign rs`` start from: tokenizer, policy, reward model, prompts.

``--policy`` is an earlier jaxalign run (``DIR`` or ``DIR/final``, e.g. an ``sft`` run), a
Hugging Face model directory, or a preset (random init, ``--model-overrides``); ``--reward`` is
a jaxalign ``rm`` run. The reward model reads the policy's token ids, so both must use the same
tokenizer (checked when the reward run has one). Everything here only reads files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax

from jaxalign.data import DataConfig, Dataset, load_jsonl
from jaxalign.models import PRESETS, RewardModel
from jaxalign.run_dir import final_dir, load_final
from jaxalign.run_loop import RunError, is_main
from jaxalign.runner import model_source
from jaxalign.tokenizer import Tokenizer

__all__ = ["PolicyRun", "is_run_dir", "load_policy_run"]


class PolicyRun(NamedTuple):
    tokenizer: Tokenizer
    policy: Any  # a CausalLM
    make_policy_params: Callable[[jax.Array], Any]  # key -> params (the key only for a preset)
    reward: RewardModel
    reward_params: Any
    prompts: Dataset  # {"prompt_ids", "prompt_mask"} batches, left-padded
    max_prompt_length: int


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished jaxalign run (``DIR`` or ``DIR/final``)."""
    try:
        final_dir(path)
    except RunError:
        return False
    return True


def _tokenizer(config: Any) -> Tokenizer:
    if config.tokenizer is not None:
        source = Path(config.tokenizer)
    elif is_run_dir(config.policy):
        source = final_dir(config.policy) / "tokenizer"
    elif os.path.isdir(config.policy):
        source = Path(config.policy)
    else:
        source = final_dir(config.reward) / "tokenizer"  # a preset policy
    if not (source.is_file() or (source / "tokenizer.json").is_file()):
        raise RunError(f"no tokenizer at {source} (expected a tokenizer.json or a directory"
                       " holding one; pass --tokenizer)")
    return Tokenizer.from_file(source)


def _vocabulary(tokenizer: Tokenizer) -> dict[str, int]:
    return tokenizer.backend.get_vocab(with_added_tokens=True)


def load_policy_run(kind: str, config: Any) -> PolicyRun:
    """Reads and checks the tokenizer, policy, reward model and the whole prompts file of a
    ``ppo`` or ``rs`` config (raises ``RunError``, or ``DataError`` on a bad record)."""
    for name in ("prompts", "policy", "reward", "out"):
        if getattr(config, name) is None:
            raise RunError("--prompts, --policy, --reward and --out are required (as flags or"
                           " in --config)")
    if not os.path.isfile(config.prompts):
        raise RunError(f"--prompts {config.prompts}: no such file")
    policy_is_run = is_run_dir(config.policy)
    if not (policy_is_run or os.path.isdir(config.policy) or config.policy in PRESETS):
        raise RunError(f"--policy {config.policy!r} is neither a finished jaxalign run (with"
                       f" final/config.json), a directory, nor a preset ({', '.join(PRESETS)})")
    try:
        reward, reward_params, _ = load_final(config.reward)
    except RunError as error:
        raise RunError(f"--reward: {error}") from None
    if not isinstance(reward, RewardModel):
        raise RunError(f"--reward {config.reward} holds a {type(reward).__name__}; {kind} needs"
                       " the reward model of a 'jaxalign rm' run")
    tokenizer = _tokenizer(config)
    reward_tokenizer = final_dir(config.reward) / "tokenizer"
    if (reward_tokenizer / "tokenizer.json").is_file() and (
            _vocabulary(Tokenizer.from_file(reward_tokenizer)) != _vocabulary(tokenizer)):
        raise RunError(f"the reward model's tokenizer ({reward_tokenizer}) differs from the"
                       " policy's: the reward model reads the policy's token ids")
    if tokenizer.vocab_size > reward.config.vocab_size:
        raise RunError(f"the tokenizer has {tokenizer.vocab_size} ids but --reward"
                       f" {config.reward} has vocab_size={reward.config.vocab_size}")
    flag = f"--policy {config.policy}"
    policy, make_params = model_source(
        kind, tokenizer, model=config.policy, init_from=config.policy if policy_is_run else None,
        model_overrides=config.model_overrides, flag=flag)
    max_len = min(policy.config.max_len, reward.config.max_len)
    prompt_length = config.max_prompt_length or max_len - config.max_new_tokens
    if prompt_length < 1 or prompt_length + config.max_new_tokens > max_len:
        raise RunError(f"prompts of up to {prompt_length} tokens + --max-new-tokens"
                       f" {config.max_new_tokens} do not fit the models' max_len={max_len}")
    prompts = load_jsonl(config.prompts, tokenizer, kind="prompt", config=DataConfig(
        max_length=max(prompt_length, 2), max_prompt_length=prompt_length,
        pad_multiple=config.pad_multiple, on_bad_record=config.on_bad_record))
    if is_main():
        print(prompts.report.summary(), file=sys.stderr)
    return PolicyRun(tokenizer, policy, make_params, reward, reward_params, prompts,
                     prompt_length)
