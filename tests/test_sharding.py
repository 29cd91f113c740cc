"""Meshes, sharding rules, the pmap data-parallel preference step, and a 2-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import sharding, train
from jaxalign.models import CausalLM, get_config, init_params

CFG = get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                 d_ff=64, max_len=32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_mesh_and_errors():
    mesh = sharding.make_mesh(fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="does not match 8 devices"):
        sharding.make_mesh(data=3)
    assert sharding.parse_mesh_spec("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="'model=2'"):
        sharding.parse_mesh_spec("model=2")


def test_param_shardings_follow_the_rules_and_skip_indivisible_dims():
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.param_shardings(model, params, mesh)
    assert shardings["trunk"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    # 3 kv heads cannot be split 2 ways: that axis stays replicated instead of failing
    odd = get_config("tiny", n_heads=3, n_kv_heads=3, d_model=48)
    odd_model = CausalLM(odd)
    odd_params = init_params(odd_model, jax.random.key(0))
    odd_sh = sharding.param_shardings(odd_model, odd_params, mesh)
    k_specs = [s.spec for path, s in jax.tree_util.tree_flatten_with_path(odd_sh)[0]
               if "k_proj" in jax.tree_util.keystr(path)]
    assert k_specs and all("tensor" not in jax.tree.leaves(tuple(s)) for s in k_specs)
    placed = jax.device_put(odd_params, odd_sh)  # must not raise
    assert placed["trunk"]["embedding"].sharding.spec == odd_sh["trunk"]["embedding"].spec


def test_optimizer_state_is_sharded_like_the_params():
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    mesh = sharding.make_mesh(fsdp=8)
    p_sh = sharding.param_shardings(model, params, mesh)
    opt = train.make_optimizer(1e-3, grad_accum_steps=2)
    opt_sh = sharding.shardings_like_params(opt.init(params), params, p_sh, mesh)
    specs = [s.spec for s in jax.tree.leaves(opt_sh)]
    # moments are sharded exactly like their parameters; step counters are replicated
    param_specs = {s.spec for s in jax.tree.leaves(p_sh)}
    assert any("fsdp" in jax.tree.leaves(tuple(s)) for s in specs) and P() in specs
    assert {s for s in specs if s != P()} <= param_specs


def _pref_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, CFG.vocab_size, (2, n, 10)).astype(np.int32)
    attn = np.ones((n, 10), np.int32)
    comp = np.zeros((n, 10), np.int32)
    comp[:, 4:] = 1
    return {"chosen_ids": ids[0], "rejected_ids": ids[1], "chosen_attention_mask": attn,
            "rejected_attention_mask": attn, "chosen_completion_mask": comp,
            "rejected_completion_mask": comp, "p_chosen": np.ones(n, np.float32)}


def test_pmap_preference_step_matches_jit():
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    opt = train.make_optimizer(1e-2, total_steps=3)
    batch = _pref_batch(16)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731

    jit_step = train.make_preference_step(model, opt, loss="dpo", beta=0.5)
    jit_state = train.create_train_state(copy(params), opt, jax.random.key(0), ref_params=params)
    pmap_step = jax.pmap(train.make_preference_step(model, opt, loss="dpo", beta=0.5,
                                                    axis_name="data"), axis_name="data")
    state = train.create_train_state(copy(params), opt, jax.random.key(0), ref_params=params)
    pmap_state = jax.tree.map(lambda x: jnp.broadcast_to(x, (8, *x.shape)), state)
    shards = jax.tree.map(lambda x: x.reshape(8, 2, *x.shape[1:]), batch)
    for _ in range(2):
        jit_state, jit_metrics = jit_step(jit_state, batch)
        pmap_state, pmap_metrics = pmap_step(pmap_state, shards)
        for name in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(pmap_metrics[name][0], jit_metrics[name], rtol=1e-4,
                                       atol=1e-6, err_msg=name)
        # accuracy counts pairs with margin > 0; at these near-zero margins rounding may flip one
        np.testing.assert_allclose(pmap_metrics["rewards/accuracies"][0],
                                   jit_metrics["rewards/accuracies"], atol=1 / 16 + 1e-6)
    # Adam divides by sqrt(v): float rounding in near-zero gradients moves a parameter by at
    # most a small fraction of the learning rate (1e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=5e-5),
                 pmap_state.params, jit_state.params)


def test_preference_step_on_a_mesh_matches_one_device():
    model = CausalLM(CFG)
    params = init_params(model, jax.random.key(1))
    opt = train.make_optimizer(1e-2, total_steps=3)
    batch = _pref_batch(16, seed=1)
    step = train.make_preference_step(model, opt, loss="ipo", beta=0.5)
    single = train.create_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0),
                                      ref_params=params)
    single, single_metrics = step(single, batch)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p_sh = sharding.param_shardings(model, params, mesh)
    state = train.create_train_state(jax.device_put(params, p_sh), opt, jax.random.key(0),
                                     ref_params=jax.device_put(params, p_sh))
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
                 jax.device_get(state.params), jax.device_get(single.params))


# ------------------------------------------------------------------ two processes
_WORKER = textwrap.dedent("""
    import json, os, sys
    nproc, pid, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
    import jax
    from jaxalign import distributed
    if nproc > 1:
        distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    import jax.numpy as jnp, numpy as np
    from jaxalign import sharding, train
    from jaxalign.train import rlhf
    from jaxalign.models import CausalLM, ValueModel, get_config, init_params
    cfg = get_config("tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                     d_ff=64, max_len=32)
    policy, value = CausalLM(cfg), ValueModel(cfg)
    config = rlhf.RLHFConfig(max_new_tokens=8, kl_coef=0.05)
    opt = train.make_optimizer(3e-3, total_steps=10, skip_nonfinite=False)
    state = rlhf.init_rlhf_state(config, init_params(policy, jax.random.key(0)), opt,
                                 value_params=init_params(value, jax.random.key(1)),
                                 value_optimizer=opt)
    reward_fn = lambda t, m: jnp.sum((t == 7) * m, axis=1).astype(jnp.float32)
    mesh = sharding.make_mesh(data=2, fsdp=2)
    step = rlhf.make_rlhf_step(policy, value, None, config, policy_optimizer=opt,
                               value_optimizer=opt, reward_fn=reward_fn, mesh=mesh)
    state = rlhf.shard_rlhf_state(state, mesh, policy=policy, value=value)
    ids = np.tile(np.array([[0, 0, 3, 4], [0, 5, 6, 2]], np.int32), (4, 1))
    rows = slice(pid * 8 // nproc, (pid + 1) * 8 // nproc)   # this process's rows
    prompts = sharding.shard_batch({"prompt_ids": ids[rows], "prompt_mask": (ids[rows] > 0).astype(np.int32)}, mesh)
    out = []
    for i in range(2):
        state, metrics = step(state, prompts, jax.random.key(i))
        out.append({k: float(v) for k, v in metrics.items()})
    norm = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)),
                   out_shardings=sharding.replicated(mesh))(state.policy_params)
    print("RESULT " + json.dumps({"metrics": out, "param_sq_norm": float(norm),
                                  "devices": jax.device_count(), "processes": jax.process_count()}))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(proc_output):
    line = [l for l in proc_output.splitlines() if l.startswith("RESULT ")]
    assert line, proc_output[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_two_processes_equal_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), "2", str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, str(script), "1", "0", "0"], env=env,
                            capture_output=True, text=True, timeout=600)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    one = _result(single.stdout + single.stderr)
    two = [_result(o) for o in outputs]
    assert one["devices"] == 4 and one["processes"] == 1
    assert two[0]["devices"] == 4 and two[0]["processes"] == 2
    for result in two:
        np.testing.assert_allclose(result["param_sq_norm"], one["param_sq_norm"], rtol=1e-5)
        for a, b in zip(result["metrics"], one["metrics"]):
            for name in a:
                # clip fractions count tokens across a threshold; rounding may flip a few of 64
                atol = 0.05 if "clipfrac" in name else 1e-5
                np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=atol, err_msg=name)
