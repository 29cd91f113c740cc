"""Hypothesis strategies for property-testing alignment code.

jaxalign's own test suite uses these; they are public so that research code built on jaxalign
can reuse them in its own property suites::

    from hypothesis import given
    from jaxalign import dpo_loss
    from jaxalign.testing import preference_logps

    @given(preference_logps())
    def test_my_variant_is_finite(batch):
        assert jnp.isfinite(dpo_loss(**batch)).all()

All strategies draw NumPy arrays (float32 unless stated) so the same example can feed an eager
call, a ``jit`` call and a float64 reference. Requires the ``hypothesis`` package (the ``test``
extra).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "betas",
    "extreme_logps",
    "logits",
    "logps",
    "masked_rollouts",
    "preference_logps",
    "rewards",
    "unpaired_logps",
]

#: Log-probs a real model produces: from "certain" down to very unlikely sequences.
LOGP_MIN = -300.0


def _floats(min_value: float, max_value: float, width: int = 32) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=min_value, max_value=max_value, allow_nan=False, allow_infinity=False,
        width=width,
    )


def logps(shape, *, min_value: float = LOGP_MIN, max_value: float = 0.0) -> st.SearchStrategy:
    """Arrays of log-probabilities in ``[min_value, max_value]`` (``≤ 0``), float32."""
    return hnp.arrays(np.float32, shape, elements=_floats(min_value, max_value))


def _extreme_floats() -> st.SearchStrategy[float]:
    special = st.sampled_from([-1e4, -1e-7, 0.0, -1e-30, -80.0])
    return st.one_of(special, _floats(-1e4, 0.0))


def extreme_logps(shape) -> st.SearchStrategy:
    """Log-prob arrays mixing ordinary values with the extremes −1e4, −1e−7 and 0."""
    return hnp.arrays(np.float32, shape, elements=_extreme_floats())


def rewards(shape, *, bound: float = 20.0) -> st.SearchStrategy:
    """Arrays of finite scalar rewards in ``[−bound, bound]``, float32."""
    return hnp.arrays(np.float32, shape, elements=_floats(-bound, bound))


@st.composite
def preference_logps(
    draw,
    *,
    batch_size: st.SearchStrategy[int] = st.integers(1, 8),
    min_value: float = LOGP_MIN,
    extreme: bool = False,
):
    """Batches of the four sequence log-probs that DPO, IPO and their variants take.

    Returns a dict with ``policy_chosen_logps``, ``policy_rejected_logps``,
    ``ref_chosen_logps`` and ``ref_rejected_logps``, each a ``[B]`` float32 array, so
    ``dpo_loss(**batch)`` works. Values lie in ``[min_value, 0]``; with ``extreme`` they are
    drawn as by :func:`extreme_logps` instead (−1e4, −1e−7 and 0 among them).
    """
    size = draw(batch_size)
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    strategy = extreme_logps((size,)) if extreme else logps((size,), min_value=min_value)
    return {name: draw(strategy) for name in names}


def betas(*, min_value: float = 0.01, max_value: float = 2.0) -> st.SearchStrategy[float]:
    """Python-float inverse temperatures β in ``[min_value, max_value]`` (TRL's default is 0.1)."""
    return st.floats(min_value=min_value, max_value=max_value, allow_nan=False)


@st.composite
def unpaired_logps(
    draw,
    *,
    batch_size: st.SearchStrategy[int] = st.integers(1, 8),
    min_value: float = LOGP_MIN,
    extreme: bool = False,
):
    """Batches of binary-feedback examples, the inputs of KTO and BCO.

    Returns a dict with ``policy_logps`` and ``ref_logps`` (``[B]`` float32 sequence log-probs
    in ``[min_value, 0]``) and ``desirable`` (``[B]`` bool, both labels possible in one batch),
    so ``kto_loss(**batch, kl_baseline=z0)`` works. With ``extreme`` the log-probs are drawn
    as by :func:`extreme_logps` instead (−1e4, −1e−7 and 0 among them).
    """
    size = draw(batch_size)
    values = _extreme_floats() if extreme else _floats(min_value, 0.0)
    draw_logps = lambda: draw(hnp.arrays(np.float32, (size,), elements=values))  # noqa: E731
    return {
        "policy_logps": draw_logps(),
        "ref_logps": draw_logps(),
        "desirable": draw(hnp.arrays(np.bool_, (size,))),
    }


@st.composite
def masked_rollouts(
    draw,
    *,
    batch_size: st.SearchStrategy[int] = st.integers(1, 4),
    length: st.SearchStrategy[int] = st.integers(1, 12),
    allow_empty: bool = True,
):
    """Right-padded token rollouts: ``rewards``, ``values``, ``mask`` (all ``[B, T]``).

    Each row's mask is 0 on a prompt prefix, 1 on the completion, 0 on trailing padding, the
    layout jaxalign's RLHF step produces. With ``allow_empty`` some rows have no completion at
    all. Rewards and values are float32 in ``[−10, 10]``.
    """
    size, steps = draw(batch_size), draw(length)
    mask = np.zeros((size, steps), np.float32)
    for row in range(size):
        start = draw(st.integers(0, steps - 1))
        min_len = 0 if allow_empty else 1
        end = draw(st.integers(start + min_len, steps))
        mask[row, start:end] = 1.0
    return {
        "rewards": draw(rewards((size, steps), bound=10.0)),
        "values": draw(rewards((size, steps), bound=10.0)),
        "mask": mask,
    }


def logits(shape, *, bound: float = 30.0) -> st.SearchStrategy:
    """Arrays of logits ``[..., V]`` in ``[−bound, bound]``, float32."""
    return hnp.arrays(np.float32, shape, elements=_floats(-bound, bound))
