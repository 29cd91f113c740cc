"""jaxalign's SimPO and CPO losses against TRL 1.16's own ``CPOTrainer`` code.

``trl_harness.trl_cpo`` calls the real ``CPOTrainer.get_batch_loss_metrics`` with a stub model
that returns random logits, so TRL itself reduces them to sequence log-probs
(``get_batch_logps``: sums, or per-token means for SimPO), computes the chosen NLL
(``nn.CrossEntropyLoss``) and applies ``cpo_loss``. jaxalign gets the sequence log-probs from
the same ``get_batch_logps`` on the same logits. Float32 both sides, rtol 1e-5 / atol 1e-6.

Where TRL 1.16 and the papers differ:

- SimPO: TRL's ``CPOConfig`` defaults to ``cpo_alpha=1.0``, which adds CPO's NLL term to
  ``loss_type="simpo"``; the SimPO paper (arXiv:2405.14734) has no NLL term, and
  jaxalign's ``simpo_loss`` is the paper's, i.e. TRL with ``cpo_alpha=0``. TRL's
  ``simpo_gamma`` is the paper's margin γ (``cpo_trainer.py:715-722`` subtracts γ/β, then
  scales by β), the same γ jaxalign takes.
- CPO: the paper (arXiv:2401.08417) adds the sequence NLL ``−E[log π(y_w|x)]`` with weight
  1; TRL adds ``cpo_alpha`` times ``CrossEntropyLoss`` over the chosen rows
  (``cpo_trainer.py:826-845, 890``): one token mean over every chosen token of the batch. jaxalign's ``cpo_loss`` adds ``alpha·chosen_nll``
  per pair, documented as the per-token mean NLL of each chosen completion (TRL's length
  normalisation, applied per sequence; passing ``−chosen_logps`` instead gives the paper's
  sum), so it equals TRL exactly at equal lengths and after a token-weighting conversion
  otherwise.
"""

import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

import jax.numpy as jnp  # noqa: E402
import trl_harness as th  # noqa: E402

from jaxalign import losses  # noqa: E402

SEEDS = (0, 1, 2)
RTOL, ATOL = 1e-5, 1e-6


def assert_close(actual, desired):
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=ATOL)


def _mean(values) -> float:
    return float(jnp.mean(values))


# SimPO's recommended region: β ∈ [2, 2.5], γ/β ≈ 0.5; plus a small β and no margin.
SIMPO_SETTINGS = [(2.0, 1.0), (2.5, 1.4), (0.1, 0.0)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta, gamma", SIMPO_SETTINGS)
def test_simpo_matches_trl_simpo_without_nll(beta, gamma, seed):
    batch = th.make_logit_pair_batch(seed)
    trl = th.trl_cpo(batch, "simpo", beta=beta, cpo_alpha=0.0, simpo_gamma=gamma)
    chosen, rejected = batch.averaged()
    assert_close(_mean(losses.simpo_loss(chosen, rejected, beta=beta, gamma=gamma)), trl)


@pytest.mark.parametrize("beta, gamma", SIMPO_SETTINGS)
def test_simpo_at_equal_log_probs_is_softplus_gamma_like_trl(beta, gamma):
    # Rejected rows copied from the chosen rows: every margin is 0, the loss −log σ(−γ).
    batch = th.make_logit_pair_batch(3)
    b = batch.size
    same = th.LogitPairBatch(
        *(
            t[:b].repeat(2, *[1] * (t.dim() - 1))
            for t in (batch.logits, batch.input_ids, batch.attention_mask, batch.labels)
        )
    )
    trl = th.trl_cpo(same, "simpo", beta=beta, cpo_alpha=0.0, simpo_gamma=gamma)
    chosen, rejected = same.averaged()
    value = _mean(losses.simpo_loss(chosen, rejected, beta=beta, gamma=gamma))
    assert_close(value, trl)
    assert_close(value, math.log1p(math.exp(gamma)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_cpo_preference_term_matches_trl_sigmoid(beta, seed):
    # alpha = 0: no NLL term on either side, variable lengths.
    batch = th.make_logit_pair_batch(seed)
    trl = th.trl_cpo(batch, "sigmoid", beta=beta, cpo_alpha=0.0)
    chosen, rejected = batch.summed()
    nll = batch.chosen_mean_nll()
    assert_close(_mean(losses.cpo_loss(chosen, rejected, nll, beta=beta, alpha=0.0)), trl)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta, alpha", [(0.1, 1.0), (0.5, 0.3)])
def test_cpo_matches_trl_at_equal_completion_lengths(beta, alpha, seed):
    # Equal lengths: TRL's batch token mean NLL equals the mean of per-sequence means.
    batch = th.make_logit_pair_batch(seed, lengths=np.full(16, 21))
    trl = th.trl_cpo(batch, "sigmoid", beta=beta, cpo_alpha=alpha)
    chosen, rejected = batch.summed()
    nll = batch.chosen_mean_nll()
    assert_close(_mean(losses.cpo_loss(chosen, rejected, nll, beta=beta, alpha=alpha)), trl)


@pytest.mark.parametrize("seed", SEEDS)
def test_cpo_nll_per_sequence_mean_and_token_weighting_gives_trl(seed):
    # Lengths 3–40. Per-sequence mean NLLs give TRL's preference term + alpha·mean(NLL_b)
    # (each sequence weighs the same); NLL_b = (token NLL sum of b)·B / (chosen tokens in the
    # batch) reproduces TRL's CrossEntropyLoss token mean exactly.
    beta, alpha = 0.1, 1.0
    batch = th.make_logit_pair_batch(seed)
    trl = th.trl_cpo(batch, "sigmoid", beta=beta, cpo_alpha=alpha)
    trl_preference = th.trl_cpo(batch, "sigmoid", beta=beta, cpo_alpha=0.0)
    chosen, rejected = batch.summed()

    per_sequence_nll = batch.chosen_mean_nll()
    value = _mean(losses.cpo_loss(chosen, rejected, per_sequence_nll, beta=beta, alpha=alpha))
    assert_close(value, trl_preference + alpha * float(np.mean(per_sequence_nll, dtype=np.float64)))
    assert not np.isclose(value, trl, rtol=RTOL, atol=ATOL)

    chosen_lengths = batch.lengths[: batch.size]
    token_weighted_nll = (-chosen * (batch.size / chosen_lengths.sum())).astype(np.float32)
    value = _mean(losses.cpo_loss(chosen, rejected, token_weighted_nll, beta=beta, alpha=alpha))
    assert_close(value, trl)
