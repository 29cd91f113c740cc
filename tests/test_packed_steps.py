"""A packed batch (shared-prompt pairs, packed SFT sequences) trains exactly like the padded one.

The padded batches are built here from the same examples ([prompt | completion | pad] rows,
chosen and rejected apart), the packed ones by the packing collator
(``jaxalign.data._packing``): several [prompt | chosen | rejected] segments per row and spare
pair slots (``pair_valid = 0``). Loss, metrics and the parameters after one SGD update must
agree to float32 tolerance; the compiled step traces once across packed batches of different
length mixes (same PackSpec).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign import train
from jaxalign.data import Example, PackSpec
from jaxalign.data._packing import fit_example, pack
from jaxalign.models import CausalLM, init_params
from jaxalign.models.config import TransformerConfig

CFG = TransformerConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                        max_len=64, logprob_chunk=6, sliding_window=4,
                        layer_types=("sliding_attention", "full_attention"))
MODEL = CausalLM(CFG)
PAIR_SPEC = PackSpec(rows=2, length=24, capacity=4, targets=16)
SFT_SPEC = PackSpec(rows=2, length=16, capacity=4, targets=12)
LR = 0.5


def _examples(seed, lengths):
    """Examples with (prompt, chosen, rejected) lengths, random ids in [1, V)."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(1, CFG.vocab_size, n).astype(np.int32)  # noqa: E731
    return [Example(ids(p), (ids(c), ids(r))) for p, c, r in lengths]


def _padded_rows(examples, side, length):
    ids = np.zeros((len(examples), length), np.int32)
    attention, completion = np.zeros_like(ids), np.zeros_like(ids)
    for i, e in enumerate(examples):
        row = np.concatenate([e.prompt_ids, e.completion_ids[side]])
        ids[i, :len(row)], attention[i, :len(row)] = row, 1
        completion[i, len(e.prompt_ids):len(row)] = 1
    return ids, attention, completion


def _padded_pairs(examples, length=16):
    batch = {}
    for side, name in ((0, "chosen"), (1, "rejected")):
        for key, value in zip(("ids", "attention_mask", "completion_mask"),
                              _padded_rows(examples, side, length)):
            batch[f"{name}_{key}"] = value
    return batch


def _packed(examples, spec, kind):
    items = [fit_example(e, kind, spec.length, spec.targets) for e in examples]
    assert sum(item.cut for item in items) == 0  # the comparison needs the whole examples
    return pack(items, spec, kind, 0, examples)


def _step_outputs(make_step, params, batch, ref_params=None):
    state = train.create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(LR),
                                     jax.random.key(1), ref_params=ref_params)
    new_state, metrics = make_step()(state, batch)
    return new_state.params, metrics


def _assert_same(packed, padded):
    (packed_params, packed_metrics), (padded_params, padded_metrics) = packed, padded
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "logps/rejected", "nll", "tokens"):
        if name in padded_metrics:
            np.testing.assert_allclose(packed_metrics[name], padded_metrics[name], rtol=1e-5,
                                       atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(packed_params), jax.tree.leaves(padded_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "orpo"])
def test_packed_preference_step_equals_the_padded_step(params, loss):
    examples = _examples(0, [(3, 4, 2), (2, 5, 6), (5, 1, 3)])  # 3 pairs, capacity 4
    packed_batch = _packed(examples, PAIR_SPEC, "pairs")
    assert packed_batch["pair_valid"].tolist() == [1, 1, 1, 0]
    assert packed_batch["ids"].shape == (2, 24)  # 31 real slots; padded: 2 x 3 x 16 = 96
    ref_params = jax.tree.map(lambda x: x * 0.9, params)

    def make_step():
        return train.make_preference_step(MODEL, optax.sgd(LR), loss=loss, beta=0.2)

    padded = _step_outputs(make_step, params, _padded_pairs(examples), ref_params)
    packed = _step_outputs(make_step, params, packed_batch, ref_params)
    _assert_same(packed, padded)
    assert float(padded[1]["loss"]) > 0


def test_packed_sft_step_equals_the_padded_step(params):
    examples = _examples(1, [(3, 4, 0), (2, 6, 0), (4, 2, 0), (1, 3, 0)])
    packed_batch = _packed(examples, SFT_SPEC, "sequences")
    ids, attention, completion = _padded_rows(examples, 0, 10)
    padded_batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}

    def make_step():
        return train.make_sft_step(MODEL, optax.sgd(LR))

    padded = _step_outputs(make_step, params, padded_batch)
    packed = _step_outputs(make_step, params, packed_batch)
    assert float(padded[1]["tokens"]) == 15
    _assert_same(packed, padded)


def test_packed_step_traces_once_across_length_mixes(params):
    step = train.make_preference_step(MODEL, optax.sgd(LR), loss="dpo", beta=0.2)
    state = train.create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(LR),
                                     jax.random.key(1), ref_params=params)
    mixes = [[(3, 4, 2), (2, 5, 6), (5, 1, 3)], [(6, 5, 5)], [(1, 2, 1)] * 4,
             [(2, 7, 3), (4, 4, 4)]]
    losses = []
    for seed, lengths in enumerate(mixes):
        state, metrics = step(state, _packed(_examples(seed, lengths), PAIR_SPEC, "pairs"))
        losses.append(float(metrics["loss"]))
    assert step.jitted._cache_size() == 1
    assert all(np.isfinite(losses)) and len(set(losses)) == len(losses)
