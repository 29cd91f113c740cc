"""The preference step's loss family: combinations, TR-DPO reference syncing, reference-free
losses, and the unpaired KTO / BCO step, on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign as ja
from jaxalign import train
from jaxalign.models import CausalLM, get_config, init_params
from test_train import CFG, _pref_batch  # noqa: F401  (the same tiny model and pairs)

MODEL = CausalLM(CFG)


def _initial_params():
    return init_params(MODEL, jax.random.key(0))


@pytest.fixture
def params():
    return _initial_params()


def _shifted(params, delta=0.02):
    return jax.tree.map(lambda x: x + delta, params)


def _pair(params, batch):
    """``PairLogps`` of ``batch`` under ``params`` (sums and token counts)."""
    chosen, rejected = train.pair_logps(MODEL, params, batch, average=False)
    mean_c, mean_r = train.pair_logps(MODEL, params, batch, average=True)
    return chosen, rejected, mean_c, mean_r


@pytest.fixture(scope="module")
def pair_logps_of_batch_1():
    """The log-probs every loss below is checked against, computed once (one jit) for the
    module: ``_pair`` of ``_pref_batch(1)`` under the ``params`` fixture's values and under
    their shifted reference."""
    params = _initial_params()  # what the params fixture returns
    batch, ref_params = _pref_batch(1), _shifted(params)
    pair = jax.jit(_pair)
    return jax.device_get((pair(params, batch), pair(ref_params, batch)))


@pytest.mark.parametrize("loss", sorted(train.PREFERENCE_LOSSES))
def test_every_paired_loss_matches_its_pure_function_with_finite_gradients(
        params, loss, pair_logps_of_batch_1):
    """``preference_loss(loss=X)`` is the mean of the layer-1 function on the right log-probs
    (sums for the DPO family, per-token means for IPO / SimPO / ORPO), with finite gradients."""
    batch, ref_params = _pref_batch(1), _shifted(params)
    value, grads = jax.value_and_grad(
        lambda p: train.preference_loss(MODEL, p, batch, ref_params, loss=loss, beta=0.3)[0])(
        params)
    (pc, pr, mc, mr), (rc, rr, rmc, rmr) = pair_logps_of_batch_1
    nll = -mc
    expected = {
        "dpo": lambda: ja.dpo_loss(pc, pr, rc, rr, beta=0.3),
        "ipo": lambda: ja.ipo_loss(mc, mr, rmc, rmr, beta=0.3),
        "hinge": lambda: ja.hinge_loss(pc, pr, rc, rr, beta=0.3),
        "robust": lambda: ja.robust_dpo_loss(pc, pr, rc, rr, beta=0.3),
        "exo": lambda: ja.exo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=1e-3),
        "nca": lambda: ja.nca_loss(pc, pr, rc, rr, beta=0.3),
        "bco_pair": lambda: ja.bco_pair_loss(pc, pr, rc, rr, beta=0.3),
        "sppo_hard": lambda: ja.sppo_hard_loss(pc, pr, rc, rr, beta=0.3),
        "apo_zero": lambda: ja.apo_zero_loss(pc, pr, rc, rr, beta=0.3),
        "apo_down": lambda: ja.apo_down_loss(pc, pr, rc, rr, beta=0.3),
        "discopop": lambda: ja.discopop_loss(pc, pr, rc, rr, beta=0.3, tau=0.05),
        "rpo": lambda: ja.rpo_loss(pc, pr, rc, rr, nll, beta=0.3, alpha=1.0),
        "simpo": lambda: ja.simpo_loss(mc, mr, beta=0.3, gamma=0.5),
        "cpo": lambda: ja.cpo_loss(pc, pr, nll, beta=0.3, alpha=1.0),
        "orpo": lambda: ja.orpo_loss(mc, mr, nll, lam=0.1),
        "sft": lambda: nll,
    }[loss]()
    np.testing.assert_allclose(value, jnp.mean(expected), rtol=1e-5, atol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_combined_losses_are_the_weighted_sum_and_rpo_is_dpo_plus_sft(params):
    batch, ref_params = _pref_batch(2), _shifted(params)
    loss = lambda **s: train.preference_loss(MODEL, params, batch, ref_params, beta=0.2, **s)  # noqa: E731
    combined, metrics = loss(loss=("dpo", "hinge", "sft"), loss_weights=(0.7, 0.2, 0.5))
    parts = [loss(loss=name)[0] for name in ("dpo", "hinge", "sft")]
    np.testing.assert_allclose(combined, 0.7 * parts[0] + 0.2 * parts[1] + 0.5 * parts[2],
                               rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/hinge"], parts[1], rtol=1e-6)
    rpo, _ = loss(loss="rpo", rpo_alpha=0.5)
    np.testing.assert_allclose(rpo, parts[0] + 0.5 * parts[2], rtol=1e-6)
    # TRL spells the same combination loss_type=["sigmoid","sft"]: the CLI's comma syntax
    config = train.PreferenceConfig(loss="dpo,sft", loss_weights=(1, 0.5))
    assert config.loss == ("dpo", "sft") and config.weights == (1.0, 0.5)


def test_reference_free_dpo_uses_zero_reference_and_needs_no_reference(params):
    batch = _pref_batch(3)
    value, _ = train.preference_loss(MODEL, params, batch, None, loss="dpo", beta=0.2,
                                     reference_free=True)
    pc, pr, _, _ = _pair(params, batch)
    zeros = jnp.zeros_like(pc)
    np.testing.assert_allclose(value, jnp.mean(ja.dpo_loss(pc, pr, zeros, zeros, beta=0.2)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        train.preference_loss(MODEL, params, batch, None, loss="dpo")
    assert not train.PreferenceConfig(loss="simpo").needs_reference


def test_tr_dpo_syncs_the_reference_every_n_steps(params):
    """ref ← α·π + (1 − α)·ref after every ``ref_sync_every``-th update, untouched between."""
    opt = train.make_optimizer(1e-2, total_steps=10)
    step = train.make_preference_step(MODEL, opt, loss="dpo", ref_sync_every=2,
                                      ref_mixup_alpha=0.25)
    ref0 = _shifted(params, 0.05)
    state = train.create_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0),
                                     ref_params=ref0)
    state, _ = step(state, _pref_batch(0))
    jax.tree.map(np.testing.assert_array_equal, state.ref_params, ref0)  # step 1: not due
    ref_before = jax.device_get(state.ref_params)
    state, _ = step(state, _pref_batch(1))  # step 2: due
    expected = jax.tree.map(lambda r, p: 0.25 * p + 0.75 * r, ref_before,
                            jax.device_get(state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 state.ref_params, expected)
    assert step.jitted._cache_size() == 1


def _unpaired_batch(seed=0):
    pair = _pref_batch(seed)
    # desirable chosen completions and undesirable rejected ones, the KL rows mismatched
    ids = np.concatenate([pair["chosen_ids"], pair["rejected_ids"]])
    attn = np.concatenate([pair["chosen_attention_mask"], pair["rejected_attention_mask"]])
    comp = np.concatenate([pair["chosen_completion_mask"], pair["rejected_completion_mask"]])
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
            "desirable": np.repeat(np.float32([1, 0]), len(pair["chosen_ids"])),
            "kl_input_ids": np.roll(ids, 1, 0), "kl_attention_mask": np.roll(attn, 1, 0),
            "kl_completion_mask": np.roll(comp, 1, 0)}


def test_kto_step_uses_the_kl_baseline_and_learns(params):
    opt = train.make_optimizer(3e-3, total_steps=30)
    step = train.make_unpaired_step(MODEL, opt, loss="kto", beta=0.5)
    state = train.create_train_state(params, opt, jax.random.key(0), ref_params=params)
    batch = _unpaired_batch()
    # the loss at step 1 equals kto_loss with the baseline of the mismatched rows (π = ref)
    logps = train.completion_logps(MODEL, params, batch)
    kl_logps = train.completion_logps(MODEL, params, batch, "kl_")
    z0 = ja.kto_kl_baseline(kl_logps, kl_logps)
    expected = jnp.mean(ja.kto_loss(logps, logps, batch["desirable"] > 0, z0, beta=0.5))
    history = []
    for _ in range(30):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    np.testing.assert_allclose(history[0]["loss"], expected, rtol=1e-5)
    assert history[0]["kl"] == 0.0  # π = ref: the clamped baseline is 0
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["rewards/chosen"] > history[-1]["rewards/rejected"]


def test_bco_step_carries_its_running_baseline(params):
    opt = train.make_optimizer(3e-3, total_steps=20)
    config = train.PreferenceConfig(loss="bco", beta=0.5)
    step = train.make_unpaired_step(MODEL, opt, config)
    state = train.create_train_state(params, opt, jax.random.key(0), ref_params=params,
                                     loss_state=train.init_loss_state(config))
    assert float(state.loss_state.mean) == 0.0
    history = []
    for seed in range(20):
        state, metrics = step(state, _unpaired_batch(seed % 2))
        history.append(jax.device_get(metrics))
    assert float(state.loss_state.count) > 0
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/chosen"] > history[-1]["rewards/rejected"]
    with pytest.raises(ValueError, match="unpaired step takes loss 'kto' or 'bco'"):
        train.make_unpaired_step(MODEL, opt, loss="dpo")


def test_precomputed_reference_sums_serve_mean_losses(params):
    """Reference sums from ``make_reference_logps_fn`` give IPO and combinations the same loss
    as reference params in the step (means are the sums over the token counts)."""
    batch, ref_params = _pref_batch(4), _shifted(params)
    ref = train.make_reference_logps_fn(MODEL)(ref_params, batch)
    for loss in ("ipo", ("dpo", "ipo")):
        a, _ = train.preference_loss(MODEL, params, batch, ref_params, loss=loss)
        b, _ = train.preference_loss(MODEL, params, {**batch, **ref}, None, loss=loss)
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("loss", sorted(train.PREFERENCE_LOSSES))
def test_masked_positions_never_change_a_loss(params, loss):
    """Token ids past each completion (padding) are never read: every loss is unchanged when
    they are replaced by random ids."""
    batch, ref_params = _pref_batch(5), _shifted(params)
    rng = np.random.default_rng(0)
    noisy = dict(batch)
    for side in ("chosen", "rejected"):
        pad = batch[f"{side}_attention_mask"] == 0
        noisy[f"{side}_ids"] = np.where(pad, rng.integers(3, CFG.vocab_size, pad.shape),
                                        batch[f"{side}_ids"]).astype(np.int32)
    assert any(np.any(noisy[f"{s}_ids"] != batch[f"{s}_ids"]) for s in ("chosen", "rejected"))
    loss_fn = jax.jit(lambda b: train.preference_loss(MODEL, params, b, ref_params, loss=loss)[0])
    np.testing.assert_allclose(loss_fn(noisy), loss_fn(batch), rtol=1e-6, atol=1e-7)
