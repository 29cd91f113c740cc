"""KL controllers: Ziegler et al.'s proportional update and the fixed controller."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign as ja


def test_adaptive_kl_update_matches_formula():
    ctl = ja.AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10_000)
    state = ctl.init()
    np.testing.assert_allclose(state.coef, 0.2)
    # KL above target by 10%: error 0.1, coef *= 1 + 0.1 * 256/10000
    state = ctl.update(state, kl=6.6, n_steps=256)
    np.testing.assert_allclose(state.coef, 0.2 * (1 + 0.1 * 256 / 10_000), rtol=1e-6)
    # far below target: error clipped at -0.2
    state2 = ctl.update(state, kl=0.0, n_steps=1000)
    np.testing.assert_allclose(state2.coef, state.coef * (1 - 0.2 * 0.1), rtol=1e-6)


def test_adaptive_kl_drives_coef_in_the_right_direction_under_jit():
    ctl = ja.AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100)

    @jax.jit
    def run(state, kls):
        def body(s, kl):
            s = ctl.update(s, kl, 10)
            return s, s.coef
        return jax.lax.scan(body, state, kls)

    _, coefs_high = run(ctl.init(), jnp.full(20, 5.0))
    _, coefs_low = run(ctl.init(), jnp.full(20, 0.1))
    assert np.all(np.diff(coefs_high) > 0) and np.all(np.diff(coefs_low) < 0)


def test_fixed_controller_has_the_same_interface():
    ctl = ja.FixedKLController(coef=0.05)
    state = ctl.update(ctl.init(), kl=100.0, n_steps=64)
    np.testing.assert_allclose(state.coef, 0.05)
    assert isinstance(state, ja.KLControllerState)


def test_invalid_hyperparameters_raise():
    with pytest.raises(ValueError, match="target > 0"):
        ja.AdaptiveKLController(target=0.0)
