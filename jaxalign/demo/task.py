"""The demo's embedded task: controlled sentiment on generated movie reviews, and its gold reward.

In the spirit of the IMDb experiment of the DPO paper (Rafailov et al. 2023, arXiv:2305.18290,
section 6.1), without a download: reviews come from a small grammar with a sentiment lexicon,
intensifiers ("very", "extremely", "a bit") and negation ("not good" is negative). A prompt is a
review opening ("The movie was"); its completion is the rest of the review::

    The movie was | not very good, and the soundtrack was extremely dull.

The corpus is balanced: half the reviews are written to be positive, half negative, and a
fifth of each half carries a contrasting clause ("..., but the ending was weak"), so sentiment is
graded rather than binary.

**Gold reward** (:func:`gold_reward`) — the preference the demo's annotators hold and the models
never see directly. It reads the words left to right:

* a sentiment word adds its lexicon polarity (``good`` +1, ``great`` +2, ``boring`` −1,
  ``awful`` −2, ...), multiplied by the pending intensifier (``very`` ×1.5, ``extremely`` ×2,
  ``a bit`` ×0.5) and by −1 if a negation (``not``, ``never``, ``hardly``) is pending;
* a negation or an intensifier applies to the *next* sentiment word only, and both are
  cancelled by a clause boundary (``,`` ``.`` ``!`` ``;`` ``but`` ``and``).

So ``gold("not good") = −1 < 0 < gold("good") = 1 < gold("very good") = 1.5``. The score is
deterministic and used only to label preference pairs (with Bradley–Terry noise) and to
evaluate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

#: Review openings; every prompt the demo uses is one of these.
OPENINGS = (
    "The movie was",
    "I thought the acting was",
    "The plot was",
    "Honestly, the film was",
    "The ending felt",
    "The soundtrack was",
    "Overall, this movie was",
    "The characters were",
    "The dialogue was",
    "I found the story",
    "The cast was",
    "The script was",
)

#: Word polarities. Adjectives (used after "was") and verbs (used after "I").
POSITIVE_ADJECTIVES = {"good": 1.0, "great": 2.0, "wonderful": 2.0, "brilliant": 2.0,
                       "excellent": 2.0, "fun": 1.0, "charming": 1.0, "beautiful": 1.5,
                       "moving": 1.0, "enjoyable": 1.0, "clever": 1.0, "fresh": 1.0,
                       "decent": 0.5, "fine": 0.5}
NEGATIVE_ADJECTIVES = {"bad": -1.0, "terrible": -2.0, "awful": -2.0, "boring": -1.0,
                       "dull": -1.0, "weak": -1.0, "slow": -0.5, "mediocre": -0.5,
                       "forgettable": -1.0, "painful": -1.5, "silly": -0.5, "stale": -1.0,
                       "horrible": -2.0, "messy": -1.0}
POSITIVE_VERBS = {"loved": 2.0, "liked": 1.0, "enjoyed": 1.0, "recommend": 1.0}
NEGATIVE_VERBS = {"hated": -2.0, "disliked": -1.0}
LEXICON = {**POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **POSITIVE_VERBS, **NEGATIVE_VERBS}

#: Intensifiers scale the next sentiment word; "a bit" is matched as one unit.
INTENSIFIERS = {"very": 1.5, "really": 1.5, "so": 1.5, "extremely": 2.0, "incredibly": 2.0,
                "quite": 1.25, "somewhat": 0.5, "a bit": 0.5}
NEGATIONS = ("not", "never", "hardly")
CLAUSE_BREAKS = (",", ".", "!", ";", "but", "and")

_SUBJECTS = ("the acting", "the plot", "the ending", "the soundtrack", "the pacing",
             "the story", "the cast", "the dialogue", "the music", "the direction",
             "the camera work", "the humour")
_TOKEN_RE = re.compile(r"a bit|[a-z']+|[,.!;]")


def gold_reward(text: str) -> float:
    """Sentiment score of a review (or a completion) with negation and intensifiers.

    ``Σ_w polarity(w) · scale(w) · (−1 if negated(w) else 1)`` over the sentiment words ``w``,
    where ``scale`` is the preceding intensifier's factor (1 without one) and ``negated`` means a
    negation word came earlier in the same clause, after the previous sentiment word. See the
    module docstring for the lexicon and the clause breaks.

    Args:
      text: any string; unknown words are neutral, case is ignored.

    Returns:
      The score as a Python float (0.0 for text without sentiment words).
    """
    total, negate, scale = 0.0, False, 1.0
    for word in _TOKEN_RE.findall(text.lower()):
        if word in CLAUSE_BREAKS:
            negate, scale = False, 1.0
        elif word in NEGATIONS:
            negate = True
        elif word in INTENSIFIERS:
            scale = INTENSIFIERS[word]
        elif word in LEXICON:
            total += LEXICON[word] * scale * (-1.0 if negate else 1.0)
            negate, scale = False, 1.0
    return total


def gold_rewards(texts: Iterable[str]) -> np.ndarray:
    """:func:`gold_reward` of each text, ``[N]`` float64."""
    return np.asarray([gold_reward(text) for text in texts], dtype=np.float64)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _adjective_phrase(rng: np.random.Generator, positive: bool) -> str:
    """An adjective phrase of the requested polarity: plain, intensified or negated."""
    style = rng.random()
    if style < 0.25:  # negated opposite: "not boring" is positive
        opposite = NEGATIVE_ADJECTIVES if positive else POSITIVE_ADJECTIVES
        negation = _pick(rng, NEGATIONS[:1] * 3 + NEGATIONS[1:])
        return f"{negation} {_pick(rng, list(opposite))}"
    words = POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES
    adjective = _pick(rng, list(words))
    if style < 0.6:
        return f"{_pick(rng, list(INTENSIFIERS))} {adjective}"
    return adjective


def _verb_clause(rng: np.random.Generator, positive: bool) -> str:
    """A first-person verdict: "I loved it", "I would not recommend it"."""
    if rng.random() < 0.3:
        return f"I would {'' if positive else 'not '}recommend it"
    verbs = POSITIVE_VERBS if positive else NEGATIVE_VERBS
    verb = _pick(rng, [v for v in verbs if v != "recommend"])
    intensity = "really " if rng.random() < 0.3 else ""
    return f"I {intensity}{verb} it"


def _clause(rng: np.random.Generator, positive: bool) -> str:
    if rng.random() < 0.25:
        return _verb_clause(rng, positive)
    verb = _pick(rng, ("was", "was", "felt", "seemed"))
    return f"{_pick(rng, _SUBJECTS)} {verb} {_adjective_phrase(rng, positive)}"


def sample_review(rng: np.random.Generator, positive: bool) -> tuple[str, str]:
    """One review ``(prompt, completion)``; the completion starts with a space, ends in "."."""
    prompt = _pick(rng, OPENINGS)
    parts = [_adjective_phrase(rng, positive)]
    n_more = int(rng.choice(3, p=(0.35, 0.5, 0.15)))
    for index in range(n_more):
        if index == 0 and rng.random() < 0.2:  # a contrasting clause
            parts.append(", but " + _clause(rng, not positive))
        else:
            parts.append(_pick(rng, (", and ", ". ", "; ")) + _clause(rng, positive))
    text = "".join(parts)
    text = re.sub(r"\. ([a-z])", lambda m: ". " + m.group(1).upper(), text)
    return prompt, " " + text + "."


def make_corpus(num_reviews: int, seed: int) -> list[tuple[str, str]]:
    """``num_reviews`` reviews ``(prompt, completion)``, exactly half written positive."""
    rng = np.random.default_rng(seed)
    return [sample_review(rng, positive=i % 2 == 0) for i in range(num_reviews)]


def make_prompts(num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` openings drawn uniformly (with replacement) from :data:`OPENINGS`."""
    rng = np.random.default_rng(seed)
    return [_pick(rng, OPENINGS) for _ in range(num_prompts)]


def bradley_terry_label(
    reward_a: float, reward_b: float, rng: np.random.Generator, *, temperature: float
) -> bool:
    """True when a noisy annotator prefers ``a``: ``P(a ≻ b) = σ((g_a − g_b)/τ)``."""
    p_a = 1.0 / (1.0 + np.exp(-(reward_a - reward_b) / temperature))
    return bool(rng.random() < p_a)
