"""Every training step on a mesh (8 forced CPU devices): SFT and DPO on data=8, fsdp=8 and
data=2,fsdp=2,tensor=2 give the single-device numbers, with the state created directly sharded
and no device holding a full copy of a sharded array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding, train
from jaxalign.models import CausalLM, get_config, init_params

CFG = get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                 d_ff=64, max_len=32)
MODEL = CausalLM(CFG)
LR = 1e-3
LAYOUTS = {"data=8": dict(data=8), "fsdp=8": dict(data=1, fsdp=8),
           "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2)}


def _batches(kind, n=2, rows=8, length=16, prompt=5):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        def side():
            ids = rng.integers(3, CFG.vocab_size, (rows, length)).astype(np.int32)
            ends = rng.integers(prompt + 2, length + 1, rows)
            positions = np.arange(length)
            attn = (positions < ends[:, None]).astype(np.int32)
            comp = ((positions >= prompt) & (positions < ends[:, None])).astype(np.int32)
            return ids * attn, attn, comp
        if kind == "sft":
            ids, attn, comp = side()
            out.append({"input_ids": ids, "attention_mask": attn, "completion_mask": comp})
        else:
            (ci, ca, cc), (ri, ra, rc) = side(), side()
            out.append({"chosen_ids": ci, "chosen_attention_mask": ca, "chosen_completion_mask": cc,
                        "rejected_ids": ri, "rejected_attention_mask": ra,
                        "rejected_completion_mask": rc})
    return out


def _step(kind, optimizer, mesh=None):
    if kind == "sft":
        return train.make_sft_step(MODEL, optimizer, mesh=mesh)
    return train.make_preference_step(MODEL, optimizer, loss="dpo", beta=0.3, mesh=mesh)


def _run(kind, mesh=None):
    optimizer = train.make_optimizer(LR, total_steps=4)
    make_params = lambda key: init_params(MODEL, key)  # noqa: E731
    if mesh is None:
        params = make_params(jax.random.key(0))
        state = train.create_train_state(params, optimizer, jax.random.key(1),
                                         ref_params=params if kind == "dpo" else None)
    else:
        state = train.create_sharded_train_state(
            make_params, optimizer, jax.random.key(1), mesh=mesh, model=MODEL,
            params_key=jax.random.key(0), with_reference=kind == "dpo")
    step, history = _step(kind, optimizer, mesh), []
    for batch in _batches(kind):
        state, metrics = step(state, batch if mesh is None else sharding.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return state, history, step


@pytest.fixture(scope="module")
def single():
    return {kind: _run(kind) for kind in ("sft", "dpo")}


def _is_sharded(array):
    return not array.sharding.is_fully_replicated


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_mesh_step_equals_one_device(single, kind, layout):
    mesh = sharding.make_mesh(**LAYOUTS[layout])
    state, history, step = _run(kind, mesh)
    ref_state, ref_history, _ = single[kind]
    for got, want in zip(history, ref_history):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{kind} {layout} {name}")
    # Adam divides by sqrt(v): rounding in a near-zero gradient can move a weight by up to
    # ~lr in one step, so params agree to a fraction of the learning rate, metrics to 2e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=LR / 10),
                 jax.device_get(state.params), jax.device_get(ref_state.params))
    assert step.jitted._cache_size() == 1  # both batches, one compilation
    # the state lives where the rules say, created so: params, reference and Adam moments
    expected = train.train_state_shardings(state, mesh, MODEL)
    jax.tree.map(lambda leaf, want: leaf.sharding.is_equivalent_to(want, leaf.ndim) or (
        pytest.fail(f"{leaf.shape}: {leaf.sharding} != {want}")), state, expected)
    if layout != "data=8":  # fsdp/tensor split the weights: no device holds a whole one
        leaves = jax.tree.leaves((state.params, state.opt_state, state.ref_params))
        sharded = [leaf for leaf in leaves if _is_sharded(leaf)]
        assert len(sharded) >= len(jax.tree.leaves(state.params))
        for leaf in sharded:
            assert all(s.data.size < leaf.size for s in leaf.addressable_shards), leaf.shape
        # every weight matrix of the trunk is split (embed on fsdp, heads/mlp on tensor)
        assert all(_is_sharded(leaf) for leaf in jax.tree.leaves(state.params) if leaf.ndim >= 2)
    else:
        assert not any(_is_sharded(leaf) for leaf in jax.tree.leaves(state.params))
