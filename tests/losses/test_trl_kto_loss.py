"""jaxalign's KTO loss and KL baseline against TRL 1.16's own ``KTOTrainer._compute_loss``.

``trl_harness.trl_kto`` runs TRL's real method (and its ``_compute_kl_logps``) on per-token
log-probs we draw for the completions and for the mismatched "KL" completions; jaxalign gets
the sequence sums of the same float32 tensors. TRL's loss is the mean over all B examples of
``λ_D·(1 − σ(β(r − z0)))`` (desirable) and ``λ_U·(1 − σ(β(z0 − r)))`` (undesirable), with
``z0 = max(0, mean(KL log-ratios))`` computed without gradient, as in the KTO paper
(arXiv:2402.01306: the KTO loss and its batch estimate of z0); TRL and the paper agree here.
rtol 1e-5 / atol 1e-6, float32 both sides.
"""

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
MIXED = [True, True, False, True, False, False, True, True]


def assert_close(actual, desired):
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=ATOL)


def jax_kto(batch, **hyper):
    """Mean KTO loss, its baseline, and gradients w.r.t. the policy's and the KL sums."""
    ref_logps, ref_kl_logps = batch.ref_logps, batch.ref_kl_logps

    def mean_loss(policy_logps, policy_kl_logps):
        baseline = losses.kto_kl_baseline(policy_kl_logps, ref_kl_logps)
        per_example = losses.kto_loss(
            policy_logps, ref_logps, batch.desirable, baseline, **hyper
        )
        return jnp.mean(per_example), baseline

    (value, baseline), (grad, kl_grad) = jax.value_and_grad(
        mean_loss, argnums=(0, 1), has_aux=True
    )(batch.sequences.logps, batch.kl_sequences.logps)
    return float(value), float(baseline), np.asarray(grad), np.asarray(kl_grad)


KTO_SETTINGS = [
    dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33),
    dict(beta=0.5, desirable_weight=1.33, undesirable_weight=1.0),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regime", ["trained", "spread"])
@pytest.mark.parametrize("hyper", KTO_SETTINGS, ids=lambda h: "-".join(map(str, h.values())))
def test_kto_mixed_batch_positive_kl_matches_trl(hyper, regime, seed):
    batch = th.make_unpaired_batch(seed, MIXED, kl_shift=3.0, regime=regime)
    trl = th.trl_kto(batch, **hyper)
    assert trl.kl > 0.5  # the baseline is really in play
    value, baseline, grad, kl_grad = jax_kto(batch, **hyper)
    assert_close(baseline, trl.kl)
    assert_close(value, trl.loss)
    assert_close(grad, th.row_grad(trl.token_grad, batch.sequences.completion_mask))
    # z0 is a constant to the loss (TRL: torch.no_grad and .detach()).
    assert trl.kl_token_grad is None
    np.testing.assert_array_equal(kl_grad, 0.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_kto_negative_kl_estimate_clamps_baseline_to_zero_like_trl(seed):
    hyper = KTO_SETTINGS[1]
    batch = th.make_unpaired_batch(seed, MIXED, kl_shift=-3.0)
    assert np.mean(batch.kl_sequences.logps - batch.ref_kl_logps) < 0
    trl = th.trl_kto(batch, **hyper)
    value, baseline, grad, _ = jax_kto(batch, **hyper)
    assert trl.kl == 0.0 and baseline == 0.0
    assert_close(value, trl.loss)
    assert_close(grad, th.row_grad(trl.token_grad, batch.sequences.completion_mask))


@pytest.mark.parametrize("desirable", [[True] * 8, [False] * 8], ids=["all-desirable", "none"])
def test_kto_one_sided_batch_matches_trl(desirable):
    hyper = KTO_SETTINGS[1]
    batch = th.make_unpaired_batch(4, desirable, kl_shift=2.0)
    trl = th.trl_kto(batch, **hyper)
    value, baseline, _, _ = jax_kto(batch, **hyper)
    assert_close(baseline, trl.kl)
    assert_close(value, trl.loss)
