"""The math demo's embedded task: small addition problems with a verifiable answer.

Questions are additions ``a + b`` with ``0 ≤ a, b ≤ max_operand``, asked in plain arithmetic or
as small word problems. A completion either works the problem (writes the equation) or states
an answer::

    Q: Mia has 13 stamps and finds 7 more. How many now?
    A: Solution: 13 + 7 = 20            <- worked (the equation's result is the answer)
    A: The answer is 20.                <- terse

The reward is :func:`jaxalign.rewards.math_answer` — the last number of the completion against
the reference — and nothing else: GRPO is never told about the formats, the equation or the
operands.

The model is first "pretrained" (:func:`pretraining_document`) on

* equations ``13 + 7 = 20`` of every pair, four to a document in a fresh random order each
  time (the facts the sums can be recalled from), and
* worked questions (``Q: … A: Solution: 13 + 7 = 20``) of the pairs outside the held-out set,

and then fine-tuned on a few formatted examples (the SFT warm-up) that are mostly terse: three
in four state the answer without working it, as much instruction data does. A model that
answers tersely has to add in one step, which it rarely gets right; GRPO, rewarded for correct
answers only, can discover that working the problem pays.

Pairs are split into three disjoint sets: SFT examples, RL prompts (which are also the worked
pretraining questions' pairs) and held-out evaluation prompts; a held-out pair is never asked
as a question before evaluation (only its equation is in the pretraining documents, as a fact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

_NAMES = ("Mia", "Tom", "Ana", "Leo", "Sam", "Ivy", "Max", "Zoe", "Ben", "Eva", "Noah", "Lily")
_OBJECTS = ("apples", "stamps", "books", "coins", "shells", "cards", "pens", "marbles")
_GAINS = ("finds", "buys", "gets", "is given", "picks up", "wins")

__all__ = ["Problem", "all_pairs", "ask", "equation", "pretraining_document", "problems",
           "prompt_text", "split_pairs", "terse_text", "worked_text"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question with its reference answer (``a + b``)."""

    a: int
    b: int
    question: str

    @property
    def answer(self) -> int:
        return self.a + self.b

    def record(self) -> dict[str, object]:
        """``{"prompt", "answer"}``: a prompts-JSONL record (``answer`` reaches the reward)."""
        return {"prompt": prompt_text(self.question), "answer": str(self.answer)}


def prompt_text(question: str) -> str:
    """The prompt the model sees: the question, then the answer line to complete."""
    return f"Q: {question}\nA:"


def equation(a: int, b: int) -> str:
    """A pretraining fact, and the body of a worked answer."""
    return f"{a} + {b} = {a + b}"


def worked_text(a: int, b: int) -> str:
    """A worked completion: the equation, whose result is the answer."""
    return f" Solution: {equation(a, b)}"


def terse_text(a: int, b: int) -> str:
    """A terse completion: the answer alone."""
    return f" The answer is {a + b}."


def ask(a: int, b: int, rng: np.random.Generator) -> str:
    """A question for ``a + b``: plain arithmetic (a third of the time) or a word problem."""
    kind = rng.integers(3)
    if kind == 0:
        return f"What is {a} + {b}?" if rng.integers(2) else f"Compute {a} plus {b}."
    name, thing = _NAMES[rng.integers(len(_NAMES))], _OBJECTS[rng.integers(len(_OBJECTS))]
    if kind == 1:
        gain = _GAINS[rng.integers(len(_GAINS))]
        return f"{name} has {a} {thing} and {gain} {b} more. How many now?"
    return f"A box has {a} {thing} and a bag has {b}. How many in all?"


def all_pairs(max_operand: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_pairs(seed: int, *, max_operand: int, sft_pairs: int,
                heldout_fraction: float) -> dict[str, list[tuple[int, int]]]:
    """Disjoint ``{"sft", "rl", "heldout"}`` pair sets (the rest of the pairs go to RL)."""
    pairs = all_pairs(max_operand)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_heldout = int(round(heldout_fraction * len(pairs)))
    heldout = [pairs[i] for i in order[:n_heldout]]
    sft = [pairs[i] for i in order[n_heldout:n_heldout + sft_pairs]]
    rl = [pairs[i] for i in order[n_heldout + sft_pairs:]]
    return {"sft": sft, "rl": rl, "heldout": heldout}


def problems(pairs: Sequence[tuple[int, int]], count: int, seed: int) -> list[Problem]:
    """``count`` questions over ``pairs`` (every pair in turn, a fresh wording each time)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    chosen = [pairs[order[i % len(pairs)]] for i in range(count)]
    return [Problem(a, b, ask(a, b, rng)) for a, b in chosen]


def pretraining_document(rng: np.random.Generator, worked_pairs: Sequence[tuple[int, int]], *,
                         max_operand: int, worked_share: float, equations: int = 4) -> str:
    """One pretraining document: a worked question over ``worked_pairs`` (with probability
    ``worked_share``) or ``equations`` random equations of any pair, one per line."""
    if rng.random() < worked_share:
        a, b = worked_pairs[rng.integers(len(worked_pairs))]
        return prompt_text(ask(a, b, rng)) + worked_text(a, b)
    pairs = rng.integers(0, max_operand + 1, (equations, 2))
    return "\n".join(equation(int(a), int(b)) for a, b in pairs)
