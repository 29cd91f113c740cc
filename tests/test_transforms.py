"""Every layer-1 function gives the same numbers eagerly and under jit, vmap, pmap and
shard_map (over the 8 CPU devices forced in conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxalign as ja

N_DEV = 8


def _batch(seed, n=N_DEV, t=6):
    rng = np.random.default_rng(seed)
    lp = lambda *s: rng.uniform(-30, -0.05, s).astype(np.float32)  # noqa: E731
    mask = (np.arange(t)[None, :] < rng.integers(0, t + 1, (n, 1))).astype(np.float32)
    return {
        "pc": lp(n), "pr": lp(n), "rc": lp(n), "rr": lp(n),
        "logps": lp(n, t), "old_logps": lp(n, t), "ref_logps": lp(n, t),
        "adv": rng.normal(size=(n, t)).astype(np.float32),
        "values": rng.normal(size=(n, t)).astype(np.float32),
        "old_values": rng.normal(size=(n, t)).astype(np.float32),
        "rewards": rng.normal(size=(n, t)).astype(np.float32),
        "logits": rng.normal(size=(n, t, 5)).astype(np.float32),
        "mask": mask,
    }


# Per-example functions: each maps a batch (leading axis B) to per-example outputs.
PER_EXAMPLE = {
    "bradley_terry": lambda b: ja.bradley_terry_loss(b["pc"], b["pr"], margin=0.5),
    "dpo": lambda b: ja.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.3, label_smoothing=0.1),
    "ipo": lambda b: ja.ipo_loss(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.3),
    "orpo": lambda b: ja.orpo_loss(b["pc"] / 30, b["pr"] / 30, -b["pc"] / 30, lam=0.2),
    "ppo_clip": lambda b: ja.ppo_clip_loss(b["logps"], b["old_logps"], b["adv"], dual_clip=3.0),
    "value": lambda b: ja.value_loss(b["values"], b["old_values"], b["rewards"], clip_range=0.2),
    "entropy": lambda b: ja.entropy(b["logits"]),
    "kl_k3": lambda b: ja.kl_penalty(b["logps"], b["ref_logps"], estimator="k3"),
    "gae": lambda b: ja.gae(b["rewards"], b["values"], b["mask"], gamma=0.99, lam=0.9),
    "seq_logps": lambda b: ja.sequence_logprobs(
        b["logits"], (b["mask"] * 3).astype(jnp.int32), b["mask"], average=True),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_jit_vmap_pmap_shard_map_agree_with_eager(name):
    fn = PER_EXAMPLE[name]
    batch = _batch(0)
    eager = fn(batch)
    jitted = jax.jit(fn)(batch)
    # vmap over examples: each call sees a batch of one.
    add_axis = lambda x: x[None]  # noqa: E731
    vmapped = jax.vmap(lambda ex: jax.tree.map(lambda y: y[0], fn(jax.tree.map(add_axis, ex))))(batch)
    # pmap: one example per device.
    pmapped = jax.pmap(lambda ex: jax.tree.map(lambda y: y[0], fn(jax.tree.map(add_axis, ex))))(batch)
    # shard_map: the batch axis split across an 8-device mesh.
    mesh = jax.make_mesh((N_DEV,), ("data",))
    placed = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("data")))
    sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(placed)
    for other in (jitted, vmapped, pmapped, sharded):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, other)


def test_ppo_loss_under_pmap_with_pmean_matches_global_jit():
    """A data-parallel PPO loss (per-device masked means, averaged) equals the global one when
    every device holds the same number of valid tokens."""
    batch = _batch(1)
    batch["mask"] = np.ones_like(batch["mask"])

    def loss_fn(b):
        loss, metrics = ja.ppo_loss(b["logps"], b["old_logps"], b["adv"], b["values"],
                                    b["old_values"], b["rewards"], b["mask"],
                                    entropies=ja.entropy(b["logits"]), ent_coef=0.01)
        return loss, metrics

    global_loss, global_metrics = jax.jit(loss_fn)(batch)
    shards = jax.tree.map(lambda x: x.reshape(N_DEV, 1, *x.shape[1:]), batch)
    per_dev = jax.pmap(
        lambda b: jax.lax.pmean(loss_fn(b), axis_name="data"), axis_name="data")(shards)
    np.testing.assert_allclose(per_dev[0][0], global_loss, rtol=1e-5)
    np.testing.assert_allclose(per_dev[1]["clipfrac"][0], global_metrics["clipfrac"], rtol=1e-5)


@pytest.mark.parametrize("name", ["ppo_clip", "value", "kl_k3", "gae"])
def test_masked_positions_never_change_masked_ppo_loss(name):
    """Junk in masked positions never reaches a masked-mean of any per-token loss."""
    batch = _batch(2)
    junk = dict(batch)
    mask = batch["mask"] > 0
    for key in ("logps", "old_logps", "ref_logps", "adv", "values", "old_values", "rewards"):
        junk[key] = np.where(mask, batch[key], np.float32(7e3))
    out = PER_EXAMPLE[name](batch)
    out_junk = PER_EXAMPLE[name](junk)
    reduce = lambda x: ja.masked_mean(x, batch["mask"])  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(reduce(a), reduce(b), rtol=1e-6), out, out_junk)
