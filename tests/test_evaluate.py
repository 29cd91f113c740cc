"""Evaluation statistics (win rate, bootstrap CI, curve comparison), the sequence-level KL
estimator against an exact enumeration, and the demo's gold reward."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import evaluate, plots
from jaxalign.demo import task
from jaxalign.logprobs import sequence_logprobs
from jaxalign.models import CausalLM, TransformerConfig, init_params


# ----------------------------------------------------------------------------- win rate
def test_win_rate_counts_ties_as_half():
    rewards = np.array([1.0, 0.0, 0.0, 2.0])
    baseline = np.array([0.0, 0.0, 1.0, 2.0])  # win, tie, loss, tie
    np.testing.assert_array_equal(evaluate.win_outcomes(rewards, baseline), [1.0, 0.5, 0.0, 0.5])
    assert evaluate.win_rate(rewards, baseline) == 0.5
    assert evaluate.win_rate(baseline, baseline) == 0.5  # all ties


def test_win_rate_closed_form_and_antisymmetry():
    rng = np.random.default_rng(0)
    a, b = rng.integers(-3, 4, 500).astype(float), rng.integers(-3, 4, 500).astype(float)
    wins, ties = np.sum(a > b), np.sum(a == b)
    assert evaluate.win_rate(a, b) == pytest.approx((wins + ties / 2) / 500)
    assert evaluate.win_rate(a, b) + evaluate.win_rate(b, a) == pytest.approx(1.0)


def test_win_rate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="two \\[N\\] arrays"):
        evaluate.win_rate(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 10_000):
        values = (rng.random(n) < 0.6).astype(float)
        low, high = evaluate.bootstrap_ci(values, n_resamples=1000, seed=0)
        assert low < values.mean() < high
        widths.append(high - low)
    # the width scales like 1/sqrt(n): 10x for 100x the data
    assert widths[1] < widths[0] / 5
    assert widths[0] == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 100), rel=0.25)


def test_bootstrap_ci_is_deterministic_and_degenerate_for_constants():
    values = np.random.default_rng(2).random(50)
    assert evaluate.bootstrap_ci(values, seed=3) == evaluate.bootstrap_ci(values, seed=3)
    assert evaluate.bootstrap_ci(np.full(20, 0.5)) == (0.5, 0.5)


def test_win_rate_with_ci():
    rewards, baseline = np.arange(200.0), np.zeros(200)
    rate, (low, high) = evaluate.win_rate_with_ci(rewards, baseline)
    assert rate == pytest.approx((199 + 0.5) / 200)
    assert low <= rate <= high <= 1.0


def test_summarize_rewards_matches_its_parts():
    rewards, baseline = np.array([3.0, 1.0, 2.0, 0.0]), np.array([1.0, 1.0, 3.0, 0.0])
    summary = evaluate.summarize_rewards(rewards, baseline, seed=5)
    assert summary["gold_reward"] == 1.5 and summary["n"] == 4
    assert summary["gold_reward_se"] == pytest.approx(np.std(rewards, ddof=1) / 2)
    assert summary["win_rate_vs_sft"] == (1 + 0.5 + 0 + 0.5) / 4  # win, tie, loss, tie
    assert summary["win_rate_ci"] == list(evaluate.win_rate_with_ci(rewards, baseline, seed=5)[1])


def test_curve_improvement_pools_first_and_last_tenth():
    rng = np.random.default_rng(4)
    curve = [rng.normal(loc=i / 10, scale=0.1, size=64) for i in range(30)]
    gain = evaluate.curve_improvement(curve, fraction=0.1)
    assert gain["iterations_pooled"] == 3
    assert gain["first_mean"] == pytest.approx(0.1, abs=0.05)
    assert gain["last_mean"] == pytest.approx(2.8, abs=0.05)
    assert gain["improvement"] == pytest.approx(2.7, abs=0.07)
    assert 0 < gain["se"] < 0.05


# ----------------------------------------------------------------------------- KL estimator
V, NEW = 8, 2
CFG = TransformerConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                        max_len=8, initializer_range=0.5)


@pytest.fixture(scope="module")
def two_models():
    model = CausalLM(CFG)
    init = jax.jit(lambda key: init_params(model, key))
    return model, init(jax.random.key(0)), init(jax.random.key(1))


def _samples(model, params, n):
    prompt_ids = np.tile(np.array([[0, 3, 5]], np.int32), (n, 1))  # left-padded: [pad, 3, 5]
    prompt_mask = np.tile(np.array([[0, 1, 1]], np.int32), (n, 1))
    return evaluate.sample_completions(model, params, prompt_ids, prompt_mask, jax.random.key(7),
                                       max_new_tokens=NEW, eos_id=None, batch_size=512)


def test_kl_estimator_is_zero_for_identical_models(two_models):
    model, params, _ = two_models
    samples = _samples(model, params, 64)
    kl = evaluate.sequence_kl(model, params, params, samples, batch_size=512)
    assert kl.shape == (64,)
    np.testing.assert_array_equal(kl, np.zeros(64))


def test_kl_estimator_matches_exact_kl(two_models):
    """Mean of Σ_t log π − log π_ref over π's samples ≈ the exact KL by enumeration."""
    model, params, ref_params = two_models
    completions = np.array(list(itertools.product(range(V), repeat=NEW)), np.int32)  # [V², 2]
    ids = np.concatenate([np.tile([[3, 5]], (len(completions), 1)), completions], 1)
    mask = np.concatenate([np.zeros((len(ids), 2), np.int32), np.ones_like(completions)], 1)

    @jax.jit  # one compile for both parameter sets (eager flax dispatches op by op)
    def sums(p):
        return sequence_logprobs(model.apply({"params": p}, jnp.asarray(ids)), ids, mask)

    def logps(p):
        return np.asarray(sums(p), np.float64)

    log_p, log_q = logps(params), logps(ref_params)
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-4)
    exact = float(np.sum(np.exp(log_p) * (log_p - log_q)))

    samples = _samples(model, params, 4096)
    kl = evaluate.sequence_kl(model, params, ref_params, samples, batch_size=512)
    mean, se = evaluate.mean_and_se(kl)
    assert exact > 0.1  # the two random models differ
    assert abs(mean - exact) < 4 * se + 1e-3, (mean, se, exact)


def test_mean_and_se():
    mean, se = evaluate.mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert evaluate.mean_and_se([5.0]) == (5.0, 0.0)


def test_plots_write_png_files(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend
    curve = {"gold_reward": [0.0, 1.0, 2.0], "gold_reward_se": [0.1, 0.1, 0.1]}
    plots.plot_reward_curve({"ppo": curve}, str(tmp_path / "curve.png"))
    points = [{"method": "dpo", "param": "β", "value": b, "gold_reward": g, "kl_to_sft": k}
              for b, g, k in ((0.1, 2.0, 3.0), (0.3, 1.0, 1.0))]
    points += [{"method": "best-of-n", "param": "n", "value": n, "label": f"BoN n={n}",
                "kl_closed_form": True, "gold_reward": g, "kl_to_sft": k}
               for n, g, k in ((1, 0.0, 0.0), (4, 1.5, np.log(4) - 0.75))]
    plots.plot_frontier(points, str(tmp_path / "frontier.png"))
    with pytest.raises(ValueError, match="at most"):
        plots.plot_frontier([{**points[0], "method": str(i)} for i in range(20)],
                               str(tmp_path / "too_many.png"))
    for name in ("curve.png", "frontier.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a notebook's inline backend survives, and no figure is left open in pyplot
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    matplotlib.use(backend)


# ----------------------------------------------------------------------------- gold reward
def test_gold_reward_negation_and_intensifiers():
    gold = task.gold_reward
    assert gold("not good") < 0 < gold("good") < gold("very good")
    assert gold("not good") == -1.0 and gold("very good") == 1.5
    assert gold("not bad") > 0 > gold("bad") > gold("extremely bad")
    assert gold("not very good") == -1.5  # negation and intensifier both apply
    assert gold("a bit slow") == -0.25


def test_gold_reward_clause_boundaries_and_neutral_text():
    gold = task.gold_reward
    assert gold("not bad, but good") == 2.0  # the negation ends at the clause break
    assert gold("not. Good") == 1.0
    assert gold("never, very. great") == 2.0
    assert gold("The Movie Was GOOD") == 1.0  # case-insensitive
    assert gold("the plot and the cast") == 0.0
    assert gold("I would not recommend it") == -1.0
    np.testing.assert_array_equal(task.gold_rewards(["good", "bad"]), [1.0, -1.0])


def test_corpus_is_balanced_and_gold_tracks_intended_sentiment():
    corpus = task.make_corpus(2000, seed=0)
    gold = task.gold_rewards(completion for _, completion in corpus)
    assert all(prompt in task.OPENINGS for prompt, _ in corpus)
    assert np.mean(gold[0::2] > 0) > 0.85 and np.mean(gold[1::2] < 0) > 0.85
    assert abs(np.mean(gold > 0) - np.mean(gold < 0)) < 0.05


def test_bradley_terry_labels_follow_the_logistic_model():
    rng = np.random.default_rng(0)
    labels = [task.bradley_terry_label(1.0, 0.0, rng, temperature=0.5) for _ in range(4000)]
    assert np.mean(labels) == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.02)
