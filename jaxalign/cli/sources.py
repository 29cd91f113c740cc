"""Where a run's tokenizer, model and prompts come from; everything here only reads files.

A model source is a preset (random init, ``--model-overrides``), a Hugging Face model directory
or an earlier jaxalign run (``DIR`` or ``DIR/final``); its tokenizer is the run's
``final/tokenizer`` or the directory's ``tokenizer.json`` (:func:`find_tokenizer`).
:func:`model_source` is what ``sft|rm|dpo|ipo|orpo`` train and ``ppo``/``rs`` start from.
For ``ppo`` and ``rs`` (:func:`load_policy_run`) ``--policy`` is such a source and ``--reward``
a jaxalign ``rm`` run; the reward model reads the policy's token ids, so both must use the same
tokenizer (checked when the reward run has one).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax

from jaxalign import sharding
from jaxalign.cli.loop import RunError
from jaxalign.cli.options import ConfigError
from jaxalign.distributed import is_main_process
from jaxalign.cli.run_dir import final_dir, load_final
from jaxalign.data import DataConfig, Dataset, load_jsonl
from jaxalign.models import (
    PRESETS, CausalLM, ComputeConfig, RewardModel, get_config, init_head_from_causal_lm,
    init_params, load_hf,
)
from jaxalign.tokenizer import Tokenizer, apply_chat_template

__all__ = ["PolicyRun", "data_texts", "fixed_params", "mesh_from_spec", "find_tokenizer", "is_run_dir", "load_policy_run",
           "load_tokenizer", "model_source", "stop_tokens"]


class PolicyRun(NamedTuple):
    tokenizer: Tokenizer
    policy: Any  # a CausalLM
    make_policy_params: Callable[[jax.Array], Any]  # key -> params (the key only for a preset)
    reward: RewardModel | None  # None: Python reward functions score (--reward-fn)
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


def mesh_from_spec(spec: str | None) -> jax.sharding.Mesh | None:
    """The ``--mesh`` of ``AXIS=N`` entries; given sizes that need fewer devices than there are
    use the first ones (single process), a left-out ``data`` takes the rest. Without a spec:
    one device, or all of them (data parallel) in a multi-process run."""
    if spec is None:
        return sharding.make_mesh() if jax.process_count() > 1 else None
    try:
        sizes = sharding.parse_mesh_spec(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    devices = jax.devices()
    if "data" in sizes and math.prod(sizes.values()) < len(devices) and jax.process_count() == 1:
        devices = devices[:math.prod(sizes.values())]
    try:
        return sharding.make_mesh(**sizes, devices=devices)
    except ValueError as error:
        raise ConfigError(f"--mesh {spec}: {error}") from None


def find_tokenizer(explicit: str | None, *sources: str | None) -> Path | None:
    """Where a run's tokenizer is: ``explicit`` (``--tokenizer``), else that of the first model
    source (a finished run's ``final/tokenizer``, a directory itself) in ``sources``; ``None``
    when every source is a preset or missing."""
    if explicit is not None:
        return Path(explicit)
    for source in sources:
        if source is None:
            continue
        if is_run_dir(source):
            return final_dir(source) / "tokenizer"
        if os.path.isdir(source):
            return Path(source)
    return None


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer at ``path`` (a tokenizer.json or a directory holding one)."""
    if not (path.is_file() or (path / "tokenizer.json").is_file()):
        raise RunError(f"no tokenizer at {path} (expected a tokenizer.json or a directory"
                       " holding one; pass --tokenizer)")
    return Tokenizer.from_file(path)


def data_texts(path: str) -> Iterator[str]:
    """Every text of a JSONL file, to train a tokenizer on (bad lines are left to the loader)."""
    with open(path, "rb") as f:
        for raw_line in f:
            try:
                record = json.loads(raw_line)
                values = [record.get(k) for k in ("prompt", "chosen", "rejected", "completion",
                                                  "messages")]
                values += record.get("responses") or []
            except (ValueError, AttributeError, TypeError):
                continue
            for value in values:
                try:
                    yield value if isinstance(value, str) else apply_chat_template(value)
                except (ValueError, TypeError):
                    continue


def _given(params: Any, key: jax.Array) -> Any:
    del key
    return params


def fixed_params(params: Any) -> jax.tree_util.Partial:
    """``key -> params`` for parameters that already exist, as a ``Partial`` whose leaves are
    the arrays (traced callers take them as inputs)."""
    return jax.tree_util.Partial(_given, params)


def model_source(kind: str, tokenizer: Tokenizer, *, model: str = "tiny",
                 init_from: str | None = None, model_overrides: dict | None = None,
                 flag: str | None = None,
                 mesh: jax.sharding.Mesh | None = None,
                 compute: ComputeConfig | None = None) -> tuple[Any, Callable[[jax.Array], Any]]:
    """The model a ``kind`` run trains and ``key -> initial params``: a preset ``model`` (with
    ``model_overrides`` and the tokenizer's vocabulary; initialised lazily, so that bad data is
    reported before any compilation), an HF directory ``model``, or an earlier run
    ``init_from``. ``rm`` puts a score head on a causal LM's trunk; other kinds need a causal
    LM. ``flag`` names the source in messages (default ``--init-from DIR`` / ``--model X``).

    ``key -> params`` is a :class:`jax.tree_util.Partial` whose leaves are the loaded arrays
    (placed sharded on ``mesh`` when one is given), so ``train.create_sharded_train_state``
    can trace it without compiling the weights in.

    ``compute`` (``--dtype``, ``--param-dtype``, ``--remat``) applies to every source; on a
    loaded model ``model_overrides`` may change any field that keeps its weights' shapes."""
    if init_from is not None or os.path.isdir(model):
        overrides = {**(model_overrides or {}), **(compute.overrides() if compute else {})}
        if init_from is not None:
            source = flag or f"--init-from {init_from}"
            model, params, _ = load_final(init_from, mesh)
            model, params = _with_overrides(model, params, overrides, source)
        else:
            source = flag or f"--model {model}"
            try:  # tensor by tensor into the param dtype; on a mesh each device its shards
                model, params = load_hf(model, mesh=mesh, rules=sharding.DEFAULT_RULES,
                                        **overrides)
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise RunError(f"{source}: cannot load a Hugging Face model: {error}") from None
        make_params = fixed_params(params)
    else:
        source = flag or f"--model {model}"
        model_overrides = {**(model_overrides or {}), **(compute.overrides() if compute else {})}
        overrides = {**model_overrides, "vocab_size": tokenizer.vocab_size}
        if model_overrides.get("vocab_size", tokenizer.vocab_size) < tokenizer.vocab_size:
            raise RunError(f"model_overrides vocab_size={model_overrides['vocab_size']}"
                           f" is smaller than the tokenizer's {tokenizer.vocab_size} ids")
        try:
            model_config = get_config(model, **overrides)
        except TypeError as error:
            raise RunError(f"bad --model-overrides: {error}") from None
        model = (RewardModel if kind == "rm" else CausalLM)(model_config)
        make_params = jax.tree_util.Partial(_init_fn(model))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RunError(f"the tokenizer has {tokenizer.vocab_size} ids but {source} has"
                       f" vocab_size={model.config.vocab_size}")
    if kind == "rm" and not isinstance(model, RewardModel):
        lm_params = make_params(None)
        model = RewardModel(model.config)
        make_params = jax.tree_util.Partial(_head_on(model), lm_params)
    elif kind != "rm" and not isinstance(model, CausalLM):
        raise RunError(f"{kind} trains a causal LM but {source} holds a {type(model).__name__}")
    return model, make_params


def _with_overrides(model: Any, params: Any, overrides: dict, source: str) -> tuple[Any, Any]:
    """An earlier run's model with config ``overrides`` that keep its parameters' shapes, and
    its params cast to the (new) ``param_dtype``."""
    if not overrides:
        return model, params
    try:
        model = type(model)(dataclasses.replace(model.config, **overrides))
    except (TypeError, ValueError) as error:
        raise RunError(f"{source}: bad model overrides: {error}") from None
    expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    if jax.tree.map(lambda leaf: leaf.shape, expected) != jax.tree.map(lambda leaf: leaf.shape,
                                                                       params):
        raise RunError(f"{source}: the overrides {sorted(overrides)} change the shapes of its"
                       " parameters; only fields that keep its weights apply")
    return model, jax.tree.map(lambda leaf, like: leaf.astype(like.dtype), params, expected)


@functools.lru_cache(maxsize=4)
def _head_on(model: Any) -> Any:
    """``(lm_params, key) -> model params``: a fresh head on a causal LM's trunk (one function
    per model, so that traced callers compile once)."""
    return functools.partial(init_head_from_causal_lm, model)


@functools.lru_cache(maxsize=4)
def _init_fn(model: Any) -> Any:
    return jax.jit(functools.partial(init_params, model))  # eagerly: ~100 compilations


def stop_tokens(tokenizer: Tokenizer) -> int | tuple[int, ...] | None:
    """What a run's sampler stops on: every id of the checkpoint's ``generation_config.json``
    ``eos_token_id`` (``Tokenizer.stop_ids``); one id as an int, none as ``None``."""
    ids = tokenizer.stop_ids
    return ids[0] if len(ids) == 1 else (ids or None)


def _vocabulary(tokenizer: Tokenizer) -> dict[str, int]:
    return tokenizer.backend.get_vocab(with_added_tokens=True)


def _reward_model(kind: str, config: Any, mesh: Any, tokenizer: Tokenizer) -> tuple[Any, Any]:
    """``(reward model, params)`` of ``--reward``, checked against the policy's tokenizer."""
    try:
        reward, reward_params, _ = load_final(config.reward, mesh)
    except RunError as error:
        raise RunError(f"--reward: {error}") from None
    if not isinstance(reward, RewardModel):
        raise RunError(f"--reward {config.reward} holds a {type(reward).__name__}; {kind} needs"
                       " the reward model of a 'jaxalign rm' run")
    reward_tokenizer = final_dir(config.reward) / "tokenizer"
    if (reward_tokenizer / "tokenizer.json").is_file() and (
            _vocabulary(Tokenizer.from_file(reward_tokenizer)) != _vocabulary(tokenizer)):
        raise RunError(f"the reward model's tokenizer ({reward_tokenizer}) differs from the"
                       " policy's: the reward model reads the policy's token ids")
    if tokenizer.vocab_size > reward.config.vocab_size:
        raise RunError(f"the tokenizer has {tokenizer.vocab_size} ids but --reward"
                       f" {config.reward} has vocab_size={reward.config.vocab_size}")
    return reward, reward_params


def load_policy_run(kind: str, config: Any, mesh: Any = None) -> PolicyRun:
    """Reads and checks the tokenizer, policy, reward model and the whole prompts file of a
    ``ppo``, ``grpo`` or ``rs`` config (raises ``RunError``, or ``DataError`` on a bad record).
    With a ``mesh`` loaded parameters are read sharded (each device its shard). With
    ``--reward-fn`` and no ``--reward`` there is no reward model (``reward`` is ``None``)."""
    scored_by_model = config.reward is not None or not getattr(config, "reward_fn", None)
    for name in ("prompts", "policy", "out") + (("reward",) if scored_by_model else ()):
        if getattr(config, name) is None:
            raise RunError("--prompts, --policy, --reward (ppo, grpo: or --reward-fn) and --out"
                           " are required (as flags or in --config)")
    if not os.path.isfile(config.prompts):
        raise RunError(f"--prompts {config.prompts}: no such file")
    policy_is_run = is_run_dir(config.policy)
    if not (policy_is_run or os.path.isdir(config.policy) or config.policy in PRESETS):
        raise RunError(f"--policy {config.policy!r} is neither a finished jaxalign run (with"
                       f" final/config.json), a directory, nor a preset ({', '.join(PRESETS)})")
    tokenizer = load_tokenizer(find_tokenizer(config.tokenizer, config.policy, config.reward))
    reward = reward_params = None
    if config.reward is not None:
        reward, reward_params = _reward_model(kind, config, mesh, tokenizer)
    flag = f"--policy {config.policy}"
    policy, make_params = model_source(
        kind, tokenizer, model=config.policy, init_from=config.policy if policy_is_run else None,
        model_overrides=config.model_overrides, flag=flag, mesh=mesh, compute=config.compute)
    max_len = min(policy.config.max_len, reward.config.max_len if reward else math.inf)
    prompt_length = config.max_prompt_length or max_len - config.max_new_tokens
    if prompt_length < 1 or prompt_length + config.max_new_tokens > max_len:
        raise RunError(f"prompts of up to {prompt_length} tokens + --max-new-tokens"
                       f" {config.max_new_tokens} do not fit the models' max_len={max_len}")
    prompts = load_jsonl(config.prompts, tokenizer, kind="prompt", config=DataConfig(
        max_length=max(prompt_length, 2), max_prompt_length=prompt_length,
        pad_multiple=config.pad_multiple, on_bad_record=config.on_bad_record))
    if is_main_process():
        print(prompts.report.summary(), file=sys.stderr)
    return PolicyRun(tokenizer, policy, make_params, reward, reward_params, prompts,
                     prompt_length)
