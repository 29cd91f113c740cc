"""Verifiable rewards: plain Python functions on decoded text (no JAX, no model).

Every reward here has TRL's reward-function signature,
``f(prompts: list[str], completions: list[str], **columns) -> list[float]``: one float per
completion (``None`` where the reward does not apply), where ``columns`` are the dataset's extra
fields (e.g. the reference ``answer``), repeated like the prompts, and ``completion_ids`` (the
token ids of each completion, EOS included). Unknown columns are ignored, so any reward can be
combined with any other. :func:`jaxalign.train.rlhf.make_rlhf_step` calls them on the host
through ``jax.pure_callback`` (``reward_fns=[...]``); the CLI takes them as
``--reward-fn module:function`` (or ``module:factory(key=value, ...)``).

- :func:`math_answer`: 1 when the completion's final answer equals the reference number
  (``\\boxed{}`` / ``#### n`` / last-number extraction, fractions, tolerance), else 0;
- :func:`format_reward`: 1 when the completion matches a regular expression;
- :func:`length_penalty`: ``−coef`` per token beyond a free budget;
- :func:`overlong_penalty`: DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

__all__ = ["RewardFn", "answers_match", "extract_answer", "format_reward", "length_penalty",
           "math_answer", "overlong_penalty", "parse_number", "reward_name"]

RewardFn = Callable[..., "list[float | None]"]

_NUMBER = r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (nested braces allowed), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the last ``\\boxed{...}``, else the number after the last
    ``#### `` (GSM8K's marker), else the last number in the text; ``None`` if there is none.

    ``\\frac{a}{b}`` inside the box is rewritten ``a/b``.
    """
    boxed = _boxed(text)
    if boxed is not None:
        return _FRAC_RE.sub(r"(\1)/(\2)", boxed).strip()
    hashes = _HASHES_RE.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def parse_number(text: str | float | int | None) -> Fraction | None:
    """An exact number from ``"1,234"``, ``"-3.5"``, ``"3/4"``, ``"(3)/(4)"``, ``"$12"`` or
    ``"50%"`` (as 50), or ``None`` if ``text`` holds none."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return None if isinstance(text, float) and not math.isfinite(text) else Fraction(text)
    cleaned = text.replace("−", "-").replace("$", "").replace("%", "").replace(" ", "")
    cleaned = cleaned.replace("(", "").replace(")", "").rstrip(".")
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            return Fraction(numerator.replace(",", "")) / Fraction(denominator.replace(",", ""))
        return Fraction(cleaned.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference: str | float | int | None, *,
                  rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether two answers are the same number (``|a − b| ≤ max(rel_tol·|b|, abs_tol)``, so
    ``"0.75"`` matches ``"3/4"``); answers that are not numbers must be equal as stripped text.

    A reference such as GSM8K's full solution (``"... #### 72"``) is reduced with
    :func:`extract_answer` first.
    """
    if predicted is None or reference is None:
        return False
    if isinstance(reference, str) and parse_number(reference) is None:
        reference = extract_answer(reference) or reference
    a, b = parse_number(predicted), parse_number(reference)
    if a is None or b is None:
        return str(predicted).strip() == str(reference).strip()
    return abs(float(a) - float(b)) <= max(rel_tol * abs(float(b)), abs_tol)


def math_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any],
                **columns: Any) -> list[float]:
    """1.0 where the final answer of the completion (:func:`extract_answer`) equals the
    reference ``answer`` (:func:`answers_match`), else 0.0 (also when no answer is found).

    Args:
      prompts: the prompts (unused).
      completions: ``[B]`` decoded completions.
      answer: ``[B]`` reference answers (numbers, or strings such as ``"72"``, ``"3/4"`` or a
        GSM8K solution ending in ``#### 72``).

    Returns:
      ``[B]`` rewards in {0, 1}.
    """
    del prompts, columns
    return [float(answers_match(extract_answer(text), reference))
            for text, reference in zip(completions, answer, strict=True)]


def format_reward(pattern: str, *, full_match: bool = False, reward: float = 1.0) -> RewardFn:
    """A reward of ``reward`` where the completion matches the regular expression ``pattern``
    (``re.search``, or ``re.fullmatch`` of the stripped completion with ``full_match``; DOTALL),
    else 0.0. E.g. ``format_reward(r"<think>.*</think>\\s*<answer>.*</answer>", full_match=True)``
    is DeepSeek-R1's format reward (arXiv:2501.12948)."""
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full_match else compiled.search

    def format_match(prompts, completions, **columns) -> list[float]:
        return [reward if match(text.strip() if full_match else text) else 0.0
                for text in completions]

    format_match.__name__ = "format_reward"
    return format_match


def _token_counts(completions: Sequence[str], columns: dict[str, Any]) -> list[int]:
    """Tokens per completion (``completion_ids``), or characters when no ids are passed."""
    ids = columns.get("completion_ids")
    return [len(row) for row in ids] if ids is not None else [len(text) for text in completions]


def length_penalty(*, coef: float = 0.01, free_tokens: int = 0) -> RewardFn:
    """``−coef · max(0, L − free_tokens)`` with ``L`` the completion's tokens (its characters
    when the caller passes no ``completion_ids``): a linear cost of length past a budget."""
    def length_cost(prompts, completions, **columns) -> list[float]:
        return [-coef * max(0, n - free_tokens) for n in _token_counts(completions, columns)]

    length_cost.__name__ = "length_penalty"
    return length_cost


def overlong_penalty(*, max_length: int, cache_length: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), with
    ``L_max = max_length`` (the generation budget, in tokens) and ``L_cache = cache_length``:

    ``R(L) = 0`` for ``L ≤ L_max − L_cache``; ``(L_max − L_cache − L) / L_cache`` for
    ``L_max − L_cache < L ≤ L_max``; ``−1`` beyond. Added to the task reward, it penalises
    completions that run into the length limit smoothly instead of all at once.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    free = max_length - cache_length

    def overlong(prompts, completions, **columns) -> list[float]:
        return [0.0 if n <= free else -1.0 if n > max_length else (free - n) / cache_length
                for n in _token_counts(completions, columns)]

    overlong.__name__ = "overlong_penalty"
    return overlong


def reward_name(fn: Callable) -> str:
    """The name a reward function's metrics are logged under (``rewards/<name>/mean``)."""
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", type(inner).__name__)
