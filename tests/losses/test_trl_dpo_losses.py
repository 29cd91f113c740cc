"""jaxalign's DPO-family losses against TRL 1.16's own ``DPOTrainer._compute_loss``.

``trl_harness.trl_dpo`` runs TRL's real method on per-token log-probs we draw (stub trainer,
stub fused LM head); jaxalign gets the sequence log-probs reduced from the same float32
tensors. Both sides compute in float32. We compare the batch loss TRL returns (the mean over
pairs, times the loss weights) with the mean of jaxalign's ``[B]`` losses, and TRL's autograd
gradient with ``jax.grad``, to rtol 1e-5 / atol 1e-6.

Draws (``trl_harness.make_pair_batch``): B = 8 pairs, completions of 3–40 tokens, summed
log-probs in [−200, −5]; the reference either independent of the policy (``spread``), a few
nats away (``trained``), 1e-3 away (``near_ref``) or equal (``at_ref``).

Where TRL 1.16 and the paper differ, the test names the convention jaxalign follows:

- cDPO: TRL's ``"sigmoid"`` ignores ``label_smoothing`` (trl/trainer/dpo_trainer.py:1387-1388);
  jaxalign's ``dpo_loss(label_smoothing=ε)`` is Mitchell's conservative DPO, which we check
  against ``(1 − ε)·TRL(pairs) + ε·TRL(pairs flipped)``.
- RPO: TRL's ``"sft"`` term is one token mean over all chosen tokens of the batch
  (dpo_trainer.py:1495-1502); the RPO paper (arXiv:2404.19733 v3, the DPO+NLL loss)
  normalises each sequence's NLL by its own length, then averages sequences. jaxalign takes
  the NLL per pair and the caller reduces; we check both reductions.
- IPO: TRL divides the summed log-ratios by the completion length (dpo_trainer.py:1393-1404),
  so jaxalign's ``ipo_loss`` is given per-token means.
"""

import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import trl_harness as th  # noqa: E402

from jaxalign import losses  # noqa: E402

SEEDS = (0, 1, 2)
RTOL, ATOL = 1e-5, 1e-6


def assert_close(actual, desired, **kwargs):
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=ATOL, **kwargs)


def jax_mean_and_grad(loss_fn, batch, *extra, **hyper):
    """``mean(loss_fn(...))`` on the summed log-probs and its gradient with respect to the
    policy's chosen and rejected sums, in TRL's row order ``[chosen..., rejected...]``."""
    pc, pr, rc, rr = batch.summed()

    def mean_loss(pc, pr):
        return jnp.mean(loss_fn(pc, pr, rc, rr, *extra, **hyper))

    value, (grad_c, grad_r) = jax.value_and_grad(mean_loss, argnums=(0, 1))(pc, pr)
    return float(value), np.concatenate([grad_c, grad_r])


def trl_row_grad(result, batch):
    return th.row_grad(result.token_grad, batch.sequences.completion_mask)


# Losses on summed log-probs: (TRL loss_type, jaxalign function, jaxalign hyperparameters).
# TRL reads the same names, except DiscoPOP's τ (``args.discopop_tau``).
SUMMED_CASES = [
    ("sigmoid", "dpo_loss", dict(beta=0.1)),
    ("sigmoid", "dpo_loss", dict(beta=0.5)),
    ("hinge", "hinge_loss", dict(beta=0.1)),
    ("hinge", "hinge_loss", dict(beta=0.5)),
    ("robust", "robust_dpo_loss", dict(beta=0.1, label_smoothing=0.1)),
    ("robust", "robust_dpo_loss", dict(beta=0.5, label_smoothing=0.3)),
    ("robust", "robust_dpo_loss", dict(beta=0.1, label_smoothing=0.0)),
    ("exo_pair", "exo_loss", dict(beta=0.1, label_smoothing=1e-3)),
    ("exo_pair", "exo_loss", dict(beta=0.5, label_smoothing=0.2)),
    ("nca_pair", "nca_loss", dict(beta=0.1)),
    ("nca_pair", "nca_loss", dict(beta=0.5)),
    ("bco_pair", "bco_pair_loss", dict(beta=0.1)),
    ("bco_pair", "bco_pair_loss", dict(beta=0.5)),
    ("sppo_hard", "sppo_hard_loss", dict(beta=0.1)),
    ("sppo_hard", "sppo_hard_loss", dict(beta=0.5)),
    ("apo_zero", "apo_zero_loss", dict(beta=0.1)),
    ("apo_zero", "apo_zero_loss", dict(beta=0.5)),
    ("apo_down", "apo_down_loss", dict(beta=0.1)),
    ("apo_down", "apo_down_loss", dict(beta=0.5)),
    # β = 0.1 keeps |β·h| ≤ 39 on these draws; TRL evaluates exp(−β·h) unclamped.
    ("discopop", "discopop_loss", dict(beta=0.1, tau=0.05)),
    ("discopop", "discopop_loss", dict(beta=0.1, tau=1.0)),
]


def _trl_hyper(hyper):
    trl = dict(hyper)
    if "tau" in trl:
        trl["discopop_tau"] = trl.pop("tau")
    return trl


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regime", th.REGIMES)
@pytest.mark.parametrize(
    "loss_type, fn_name, hyper",
    SUMMED_CASES,
    ids=[f"{fn}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for _, fn, h in SUMMED_CASES],
)
def test_summed_logp_loss_matches_trl(loss_type, fn_name, hyper, regime, seed):
    batch = th.make_pair_batch(seed, regime)
    trl = th.trl_dpo(batch, loss_type, **_trl_hyper(hyper))
    value, grad = jax_mean_and_grad(getattr(losses, fn_name), batch, **hyper)
    assert_close(value, trl.loss)
    assert_close(grad, trl_row_grad(trl, batch))


def test_discopop_stays_finite_where_trl_exp_overflows_to_nan():
    # TRL computes exp(−z)·σ(z/τ) literally (dpo_trainer.py:1483-1493): for z = β·h < −88 in
    # float32 that is inf·0 = nan. The paper's loss there is −log σ(z) + e^{z(1/τ − 1)} →
    # −log σ(z) for τ < 1; jaxalign evaluates the product in log space (its docstring) and
    # returns that finite value. Same draws as above, β = 1: margins down to −390.
    batch = th.make_pair_batch(0, "spread")
    assert math.isnan(th.trl_dpo(batch, "discopop", beta=1.0, discopop_tau=0.05).loss)
    z = 1.0 * (
        (batch.policy_chosen_logps - batch.ref_chosen_logps)
        - (batch.policy_rejected_logps - batch.ref_rejected_logps)
    )
    assert z.min() < -88
    disco = np.asarray(losses.discopop_loss(*batch.summed(), beta=1.0, tau=0.05))
    dpo = np.asarray(losses.dpo_loss(*batch.summed(), beta=1.0))
    assert np.all(np.isfinite(disco))
    assert_close(disco[z < -88], dpo[z < -88])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regime", th.REGIMES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_on_mean_logps_matches_trl_length_normalised_ipo(beta, regime, seed):
    # TRL "ipo" divides each summed log-ratio by its completion length, i.e. it is IPO on
    # per-token mean log-probs, which is what jaxalign's ipo_loss is given.
    batch = th.make_pair_batch(seed, regime)
    trl = th.trl_dpo(batch, "ipo", beta=beta)
    pc, pr, rc, rr = batch.averaged()

    def mean_loss(pc, pr):
        return jnp.mean(losses.ipo_loss(pc, pr, rc, rr, beta=beta))

    value, (grad_c, grad_r) = jax.value_and_grad(mean_loss, argnums=(0, 1))(pc, pr)
    assert_close(value, trl.loss)
    # d/d(sum) = d/d(mean) / length.
    grad = np.concatenate([grad_c, grad_r]) / batch.sequences.lengths
    assert_close(grad, trl_row_grad(trl, batch))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regime", ["spread", "trained"])  # at π = π_ref cDPO is DPO (ln 2)
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_label_smoothing_is_paper_mixture_of_trl_sigmoid_on_both_label_orders(
    label_smoothing, regime, seed
):
    # TRL 1.16's "sigmoid" ignores label_smoothing (dpo_trainer.py:1387-1388); conservative DPO
    # (Mitchell 2023) is (1 − ε)·DPO(y_w ≻ y_l) + ε·DPO(y_l ≻ y_w), and jaxalign's dpo_loss
    # follows the paper (as TRL's "sigmoid" did before it dropped the smoothing term).
    eps, beta = label_smoothing, 0.1
    batch = th.make_pair_batch(seed, regime)
    trl_plain = th.trl_dpo(batch, "sigmoid", beta=beta)
    trl_flipped = th.trl_dpo(batch.swapped(), "sigmoid", beta=beta)
    assert th.trl_dpo(batch, "sigmoid", beta=beta, label_smoothing=eps).loss == trl_plain.loss

    value, _ = jax_mean_and_grad(losses.dpo_loss, batch, beta=beta, label_smoothing=eps)
    assert_close(value, (1 - eps) * trl_plain.loss + eps * trl_flipped.loss)
    # cDPO − DPO = ε·β·mean(h): the smoothing term is really there.
    assert not np.isclose(value, trl_plain.loss, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regime", th.REGIMES)
def test_weighted_sigmoid_plus_hinge_matches_trl_loss_weights(regime, seed):
    beta = 0.1
    batch = th.make_pair_batch(seed, regime)
    trl = th.trl_dpo(batch, ["sigmoid", "hinge"], loss_weights=[0.7, 0.3], beta=beta)
    dpo, dpo_grad = jax_mean_and_grad(losses.dpo_loss, batch, beta=beta)
    hinge, hinge_grad = jax_mean_and_grad(losses.hinge_loss, batch, beta=beta)
    assert_close(0.7 * dpo + 0.3 * hinge, trl.loss)
    assert_close(0.7 * dpo_grad + 0.3 * hinge_grad, trl_row_grad(trl, batch))


# -------------------------------------------------------------------------------- RPO
RPO_ALPHAS = [1.0, 0.5]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regime", ["spread", "trained", "near_ref"])
@pytest.mark.parametrize("alpha", RPO_ALPHAS)
def test_rpo_matches_trl_sigmoid_plus_weighted_sft_at_equal_lengths(alpha, regime, seed):
    # With every chosen completion the same length, TRL's batch token mean of the chosen NLL
    # equals the mean of per-sequence means, so no conversion is needed.
    beta = 0.1
    batch = th.make_pair_batch(seed, regime, lengths=np.full(16, 17))
    trl = th.trl_dpo(batch, ["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta)
    value, _ = jax_mean_and_grad(
        losses.rpo_loss, batch, batch.chosen_mean_nll(), beta=beta, alpha=alpha
    )
    assert_close(value, trl.loss)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha", RPO_ALPHAS)
def test_rpo_nll_per_sequence_mean_is_paper_and_token_weighting_gives_trl(alpha, seed):
    # RPO (arXiv:2404.19733 v3) length-normalises each chosen sequence's NLL, then
    # averages over pairs; TRL's "sft" term (dpo_trainer.py:1495-1502) is one token mean over
    # all chosen tokens of the batch, which weights long completions more. jaxalign's rpo_loss
    # adds alpha·chosen_nll per pair, so the caller picks the reduction:
    # - per-sequence means (the paper): TRL's DPO term + alpha·mean(per-sequence NLL);
    # - chosen_nll_b = (token NLL sum of b)·B / (chosen tokens in the batch): TRL exactly.
    beta = 0.1
    batch = th.make_pair_batch(seed, "trained")
    trl = th.trl_dpo(batch, ["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta)
    trl_dpo_term = th.trl_dpo(batch, "sigmoid", beta=beta).loss

    paper_nll = batch.chosen_mean_nll()
    paper, _ = jax_mean_and_grad(losses.rpo_loss, batch, paper_nll, beta=beta, alpha=alpha)
    assert_close(paper, trl_dpo_term + alpha * float(np.mean(paper_nll, dtype=np.float64)))
    assert abs(paper - trl.loss) > 1e-4  # lengths 3–40: the two reductions really differ

    chosen_lengths = batch.chosen(batch.sequences.lengths)
    token_weighted_nll = (
        -batch.policy_chosen_logps * (batch.size / chosen_lengths.sum())
    ).astype(np.float32)
    value, _ = jax_mean_and_grad(
        losses.rpo_loss, batch, token_weighted_nll, beta=beta, alpha=alpha
    )
    assert_close(value, trl.loss)


# ------------------------------------------------------------------ closed forms, harness
def test_harness_gives_trl_the_log_probs_jaxalign_gets():
    batch = th.make_pair_batch(0, "at_ref")
    trl = th.trl_dpo(batch, "sigmoid", beta=0.1)
    assert trl.metrics["logps/chosen"] == pytest.approx(float(np.mean(batch.summed()[0])))
    assert trl.metrics["logps/rejected"] == pytest.approx(float(np.mean(batch.summed()[1])))
    assert trl.metrics["rewards/margins"] == 0.0
    # π = π_ref: DPO is ln 2, hinge 1, SPPO-hard 2·(1/(2β))², APO-zero 1 (both sides).
    assert trl.loss == pytest.approx(math.log(2), rel=1e-6)
    assert th.trl_dpo(batch, "hinge", beta=0.1).loss == pytest.approx(1.0)
    assert th.trl_dpo(batch, "sppo_hard", beta=0.1).loss == pytest.approx(50.0)
    assert th.trl_dpo(batch, "apo_zero", beta=0.1).loss == pytest.approx(1.0)
