"""AI feedback (position-debiased judging, soft labels), best-of-N and rejection sampling."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.train import best_of_n as bon
from jaxalign.train import scorers
from jaxalign import feedback, train
from jaxalign.data import load_jsonl
from jaxalign.losses import dpo_loss
from jaxalign.models import CausalLM, RewardModel, get_config, init_params
from jaxalign.sampling import make_generate
from jaxalign.tokenizer import Tokenizer

TEXTS = ["The movie was good.", "The movie was bad.", "Which response is better (A) or (B)?",
         "The answer is (A", "The answer is (B", "a very fine film", "not a good plot"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(TEXTS, vocab_size=300, min_frequency=1)


class BiasedJudge(nn.Module):
    """A judge that strongly prefers whatever is labelled (A), plus a content-dependent term."""

    vocab_size: int
    a_id: int

    @nn.compact
    def __call__(self, tokens, attention_mask=None):
        emb = nn.Embed(self.vocab_size, 8)(tokens) * attention_mask[..., None]
        logits = nn.Dense(self.vocab_size)(jnp.cumsum(emb, axis=1))
        return logits + 5.0 * jax.nn.one_hot(self.a_id, self.vocab_size)[None, None, :]


def _judge(tokenizer, kind="biased"):
    a_id, _ = feedback.option_token_ids(tokenizer)
    if kind == "biased":
        model = BiasedJudge(tokenizer.vocab_size, a_id)
        params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)))["params"]
    else:
        cfg = get_config("tiny", vocab_size=tokenizer.vocab_size, max_len=256)
        model = CausalLM(cfg)
        params = init_params(model, jax.random.key(1))
    return model, params


@pytest.mark.parametrize("kind", ["biased", "random_lm"])
def test_position_bias_cancels(tokenizer, kind):
    model, params = _judge(tokenizer, kind)
    prompts = ["Review:", "Review:", "Say something."]
    a = ["The movie was good.", "not a good plot", "a very fine film"]
    b = ["The movie was bad.", "not a good plot", "The movie was good."]
    constitution = ("Choose the more positive review.", "Choose the more fluent review.")
    p = feedback.label_pairs(model, params, tokenizer, prompts, a, b, constitution, batch_size=4)
    p_swapped = feedback.label_pairs(model, params, tokenizer, prompts, b, a, constitution, batch_size=4)
    np.testing.assert_allclose(p[1], 0.5, atol=1e-6)          # identical responses
    np.testing.assert_allclose(p + p_swapped, 1.0, atol=1e-6)  # swapping gives 1 - P
    assert ((p > 0) & (p < 1)).all()
    if kind == "biased":
        # read in one ordering only, this judge says "A" with probability > 0.95
        raw = np.exp(np.asarray(feedback._option_logprob_fn(model, *feedback.option_token_ids(tokenizer))(
            params, *tokenizer.encode_batch([feedback.judge_prompt("Review:", a[0], b[0], constitution[0])],
                                            padding_side="left"))))
        assert raw[0, 0] > 0.95 and abs(p[0] - 0.5) < 0.25, (raw, p)


def test_reward_model_judge_is_sigmoid_of_the_reward_difference(tokenizer, tmp_path):
    """σ(r_a − r_b), with r read on the very sequences reward training sees (BOS … EOS)."""
    cfg = get_config("tiny", vocab_size=tokenizer.vocab_size, max_len=128)
    model = RewardModel(cfg)
    params = init_params(model, jax.random.key(2))
    p = feedback.label_pairs(model, params, tokenizer, ["Q:"] * 2, [" good", " bad"],
                             [" bad", " bad"])
    path = tmp_path / "pair.jsonl"
    path.write_text(json.dumps({"prompt": "Q:", "chosen": " good", "rejected": " bad"}) + "\n")
    batch = load_jsonl(path, tokenizer, kind="preference").collate(np.arange(1))
    assert batch["chosen_ids"][0, 0] == tokenizer.bos_id
    r = [float(model.apply({"params": params}, batch[f"{side}_ids"],
                           batch[f"{side}_attention_mask"])[0]) for side in ("chosen", "rejected")]
    assert abs(r[0] - r[1]) > 1e-4  # a real difference to compare against
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-(r[0] - r[1]))), 0.5], rtol=1e-5)


def test_preference_records_carry_soft_labels(tmp_path):
    records = feedback.preference_records(["p", "q", "r"], ["x", "y", "z"], ["u", "v", "z"], np.array([0.8, 0.3, 0.5]))
    assert records == [
        {"prompt": "p", "chosen": "x", "rejected": "u", "p_chosen": 0.8},
        {"prompt": "q", "chosen": "v", "rejected": "y", "p_chosen": pytest.approx(0.7)},
    ]
    path = tmp_path / "pairs.jsonl"
    feedback.write_jsonl(path, records)
    assert len(path.read_text().splitlines()) == 2


def test_soft_labels_in_the_dpo_step_are_conservative_dpo():
    cfg = get_config("tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    model = CausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 32, (2, 3, 8)).astype(np.int32)
    comp = np.zeros((3, 8), np.int32)
    comp[:, 3:] = 1
    p_chosen = np.array([1.0, 0.8, 0.6], np.float32)
    batch = {"chosen_ids": ids[0], "rejected_ids": ids[1], "chosen_attention_mask": np.ones((3, 8), np.int32),
             "rejected_attention_mask": np.ones((3, 8), np.int32), "chosen_completion_mask": comp,
             "rejected_completion_mask": comp, "p_chosen": p_chosen,
             "ref_chosen_logps": np.array([-30.0, -20, -25], np.float32),
             "ref_rejected_logps": np.array([-28.0, -26, -21], np.float32)}
    loss, _ = train.preference_loss(model, params, batch, loss="dpo", beta=0.3)
    chosen, rejected = train.pair_logps(model, params, batch, average=False)
    expected = dpo_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                        beta=0.3, label_smoothing=1.0 - p_chosen).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_load_constitution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n  - Be honest.\n  - Be kind.\n")
    assert feedback.load_constitution(path) == ("Be honest.", "Be kind.")
    path.write_text("[]\n")
    with pytest.raises(ValueError, match="non-empty list"):
        feedback.load_constitution(path)


TARGET = 7
CFG = get_config("tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
count_target = scorers.completion_scorer(
    lambda tokens, mask: jnp.sum((tokens == TARGET) * mask, axis=1).astype(jnp.float32))


def _prompts():
    ids = np.tile(np.array([[0, 3, 4], [5, 6, 2]], np.int32), (2, 1))
    return {"prompt_ids": ids, "prompt_mask": (ids > 0).astype(np.int32)}


def test_best_of_n_returns_the_argmax():
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    out = bon.best_of_n(model, params, count_target, _prompts(), 8, jax.random.key(1), max_new_tokens=10)
    scores = np.asarray(out.scores)
    assert scores.shape == (4, 8)
    np.testing.assert_array_equal(out.best_index, scores.argmax(axis=1))
    np.testing.assert_array_equal(out.tokens, np.asarray(out.all_tokens)[np.arange(4), scores.argmax(axis=1)])
    recount = np.sum(np.asarray(out.tokens) == TARGET, axis=1)
    np.testing.assert_array_equal(recount, scores.max(axis=1))


def test_best_of_n_kl_closed_form():
    assert bon.best_of_n_kl(1) == 0.0
    np.testing.assert_allclose(bon.best_of_n_kl(4), np.log(4) - 0.75)


def test_rejection_sampling_raises_the_reward():
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    opt = train.make_optimizer(1e-2, total_steps=100)
    _, log = bon.rejection_sampling_finetune(model, params, count_target, _prompts(), jax.random.key(3),
                                             optimizer=opt, n=8, rounds=4, steps_per_round=8,
                                             max_new_tokens=10)
    assert log[-1]["mean_score"] > log[0]["mean_score"] + 0.5, log
    assert all(entry["best_score"] >= entry["mean_score"] for entry in log)


def test_reward_model_scorer_params_are_arguments_not_constants():
    """best_of_n with a reward-model scorer compiles once for two different reward params (they
    enter as arguments, not as constants baked into the program), and each call scores with its
    own params: the scores equal the reward model applied directly."""
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    rm = RewardModel(CFG)
    prompts = _prompts()
    bon._make_best_of_n.cache_clear()
    outs = []
    for seed in (1, 2):
        rm_params = init_params(rm, jax.random.key(seed))
        out = bon.best_of_n(model, params, scorers.reward_model_scorer(rm, rm_params), prompts, 3,
                            jax.random.key(5), max_new_tokens=6)
        ids = np.repeat(prompts["prompt_ids"], 3, axis=0)
        mask = np.repeat(prompts["prompt_mask"], 3, axis=0)
        tokens = np.asarray(out.all_tokens).reshape(12, -1)
        comp = np.asarray(out.all_masks).reshape(12, -1)
        direct = rm.apply({"params": rm_params}, np.concatenate([ids, tokens], 1),
                          np.concatenate([mask, comp], 1))
        np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), direct, rtol=1e-5, atol=1e-6)
        outs.append(out)
    assert not np.allclose(outs[0].scores, outs[1].scores)
    run = bon._make_best_of_n(make_generate(model, max_new_tokens=6), 3)
    assert run._cache_size() == 1
