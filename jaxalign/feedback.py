"""AI feedback: constitutional preference labelling with a judge model.

A *constitution* is a list of principles. :func:`label_pairs` asks a judge causal LM, for every
pair of responses and every principle::

    {prompt}

    Which response is better according to: {principle}
    (A) {response_a}
    (B) {response_b}
    The answer is (

and reads the judge's next-token log-probabilities of ``A`` and ``B`` (normalised over the two).
Each pair is judged in **both orderings** and averaged — ``P(a ≻ b) = ½(P_A(a first) +
P_B(b first))`` — which cancels position bias exactly: identical responses get 0.5 and
swapping the responses gives ``1 − P``. The result is averaged over principles. A reward
model can judge instead: ``P(a ≻ b) = σ(r_a − r_b)``.

The soft labels go into a standard preference JSONL with ``"p_chosen"``, which the reward step
(soft Bradley–Terry) and the DPO step (conservative DPO, ``ε = 1 − p``) read.

References:
  Bai et al., "Constitutional AI: Harmlessness from AI Feedback", arXiv:2212.08073.
  Lee et al., "RLAIF: Scaling Reinforcement Learning from Human Feedback with AI Feedback",
  arXiv:2309.00267 (position-bias mitigation by averaging both orders).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxalign.batching import map_batches
from jaxalign.data import DataConfig
from jaxalign.models.heads import RewardModel

DEFAULT_CONSTITUTION = (
    "Choose the response that is the most helpful, honest, and harmless.",
)

JUDGE_TEMPLATE = (
    "{prompt}\n\nWhich response is better according to: {principle}\n"
    "(A) {a}\n(B) {b}\nThe answer is ("
)


def load_constitution(path: str | os.PathLike) -> tuple[str, ...]:
    """Principles from a YAML/JSON file: a list of strings or ``{"principles": [...]}``."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict):
        data = data.get("principles")
    if not isinstance(data, list) or not data or not all(isinstance(p, str) and p.strip() for p in data):
        raise ValueError(
            f"{path}: a constitution is a non-empty list of principle strings "
            "(or a mapping with such a list under 'principles')"
        )
    return tuple(p.strip() for p in data)


def judge_prompt(prompt: str, response_a: str, response_b: str, principle: str) -> str:
    """The judge's input text for one ordering of one pair under one principle."""
    return JUDGE_TEMPLATE.format(prompt=prompt, a=response_a, b=response_b, principle=principle)


def option_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Token ids of ``A`` and ``B`` as the judge would write them right after ``(``."""
    ids = []
    for option in ("A", "B"):
        encoded = tokenizer.encode(option)
        if len(encoded) != 1:
            raise ValueError(f"option {option!r} is not a single token for this tokenizer: {encoded}")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise ValueError("options 'A' and 'B' map to the same token")
    return ids[0], ids[1]


@functools.lru_cache(maxsize=16)
def _option_logprob_fn(model, a_id: int, b_id: int):
    @jax.jit
    def option_logprobs(params, ids, mask):
        logits = model.apply({"params": params}, ids, mask)[:, -1]   # left-padded: last = next
        pair = jnp.stack([logits[:, a_id], logits[:, b_id]], axis=-1).astype(jnp.float32)
        return jax.nn.log_softmax(pair, axis=-1)                      # [N, 2]: log P(A), log P(B)
    return option_logprobs


@functools.lru_cache(maxsize=16)
def _reward_fn(model):
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


def _batched(fn, params, tokenizer, texts, *, max_length, batch_size, padding_side,
             **encode_kwargs):
    """Runs ``fn(params, ids, mask)`` over the tokenised ``texts`` in fixed-shape batches."""
    if not texts:
        return np.zeros((0,), np.float32)
    ids, mask = tokenizer.encode_batch(list(texts), max_length=max_length,
                                       padding_side=padding_side, truncation_side="left",
                                       **encode_kwargs)
    return map_batches(lambda _, *batch: fn(params, *batch), (ids, mask), batch_size)


def label_pairs(
    judge_model: Any,
    judge_params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    constitution: Sequence[str] = DEFAULT_CONSTITUTION,
    *,
    max_length: int = 256,
    batch_size: int = 16,
    add_bos: bool = DataConfig.add_bos,
    add_eos: bool = DataConfig.add_eos,
) -> np.ndarray:
    """``P(a ≻ b)`` for every pair, from a judge LM (or reward model), position-debiased.

    Args:
      judge_model: a ``CausalLM`` (constitutional judging) or a ``RewardModel``
        (``σ(r_a − r_b)`` on ``prompt + response``; the constitution is then unused).
      judge_params: its parameters.
      tokenizer: a :class:`jaxalign.tokenizer.Tokenizer`.
      prompts, responses_a, responses_b: N strings each.
      constitution: principles; the labels are averaged over them.
      max_length: judge inputs are left-truncated to this many tokens (the question and
        answer cue at the end are kept).
      batch_size: judge forward-pass batch (fixed, so the judge compiles once).
      add_bos, add_eos: a reward-model judge scores ``BOS + prompt + response + EOS``, the
        sequences :func:`jaxalign.data.load_jsonl` builds for reward training by default
        (``DataConfig.add_bos``/``add_eos``), so it reads its score at the token it was trained
        to score at; set them as the judge was trained. Unused by a causal-LM judge.

    Returns:
      ``[N]`` float64 probabilities that response a is better than response b.
    """
    n = len(prompts)
    if not (len(responses_a) == len(responses_b) == n):
        raise ValueError(
            f"prompts, responses_a and responses_b must have the same length; got {n}, "
            f"{len(responses_a)}, {len(responses_b)}"
        )
    if isinstance(judge_model, RewardModel):
        texts = [p + r for p, r in zip(prompts, responses_a)] + [p + r for p, r in zip(prompts, responses_b)]
        rewards = _batched(_reward_fn(judge_model), judge_params, tokenizer, texts,
                           max_length=max_length, batch_size=batch_size, padding_side="right",
                           add_bos=add_bos, add_eos=add_eos)
        return 1.0 / (1.0 + np.exp(-(rewards[:n] - rewards[n:]).astype(np.float64)))
    if not constitution:
        raise ValueError("constitution must list at least one principle")
    a_id, b_id = option_token_ids(tokenizer)
    texts = []
    for principle in constitution:
        for prompt, a, b in zip(prompts, responses_a, responses_b):
            texts.append(judge_prompt(prompt, a, b, principle))   # a shown first
            texts.append(judge_prompt(prompt, b, a, principle))   # b shown first
    logps = _batched(_option_logprob_fn(judge_model, a_id, b_id), judge_params, tokenizer, texts,
                     max_length=max_length, batch_size=batch_size, padding_side="left")
    probs = np.exp(logps.astype(np.float64)).reshape(len(constitution), n, 2, 2)
    # ordering 0: a is (A) -> P(a) = P(A); ordering 1: a is (B) -> P(a) = P(B)
    p_a = 0.5 * (probs[:, :, 0, 0] + probs[:, :, 1, 1])
    return p_a.mean(axis=0)


def preference_records(
    prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
    p_a: np.ndarray,
) -> list[dict]:
    """Standard preference records with the soft label: the likelier-better response is
    ``chosen`` and ``p_chosen = max(p, 1 − p)``. Pairs of identical responses carry no
    preference and are left out (the data loader would reject them)."""
    records = []
    for prompt, a, b, p in zip(prompts, responses_a, responses_b, np.asarray(p_a, np.float64)):
        if a == b:
            continue
        chosen, rejected, p_chosen = (a, b, p) if p >= 0.5 else (b, a, 1.0 - p)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "p_chosen": float(p_chosen)})
    return records


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Writes records one JSON object per line (to a temporary file, then renamed)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
