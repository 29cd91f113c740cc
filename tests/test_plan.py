"""``jaxalign plan``: the compiled estimate against what a real run places and allocates, and the
Llama-3-8B plan against the analytic parameter and optimiser bytes.

The small plans compile in this process (conftest forces 8 CPU devices); the temp-bytes check
runs in a fresh process (so no earlier test's freed memory hides the step's growth), and the 8B
plans run the command itself, which compiles in its own subprocess.
"""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli, plan, sharding
from jaxalign import train as steps
from jaxalign.cli import plan as plan_cli
from jaxalign.cli.configs import PlanConfig
from jaxalign.cli.loop import RunError
from jaxalign.cli.options import build
from jaxalign.models import CausalLM, init_params

SMALL = {"model": "tiny", "model_overrides": {"vocab_size": 512}, "batch_size": 4,
         "max_length": 64}


def _config(**values):
    return build(PlanConfig, {**SMALL, **values})


# ------------------------------------------------------------------------------ HLO counts
def test_hlo_costs_multiply_loop_bodies_by_their_trip_counts():
    """A scan of 6 matmuls: cost_analysis counts one, hlo_costs all six (2·B·D·D each); a
    while_loop of unknown length counts ``unknown_trip_count`` times."""
    b, d, layers = 8, 64, 6

    def scanned(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    def looped(x, w):
        return jax.lax.while_loop(lambda c: jnp.sum(c[0]) < 1e9, lambda c: (c[0] @ w, c[1] + 1),
                                  (x, 0))[0]

    x, ws = jnp.ones((b, d)), jnp.ones((layers, d, d))
    compiled = jax.jit(scanned).lower(x, ws).compile()
    costs = plan.compiled_costs(compiled)
    assert costs.hlo.dot_flops == layers * 2 * b * d * d
    assert costs.xla_flops < 2 * (2 * b * d * d)  # the pitfall: the body once
    text = jax.jit(looped).lower(x, ws[0]).compile().as_text()
    assert plan.hlo_costs(text, unknown_trip_count=5) == plan.HloCosts(5 * 2 * b * d * d, {}, {},
                                                                       1)


def test_hlo_costs_read_collectives():
    """Gathering a [8·16, 32] float32 array split over 8 devices: one all-gather of its bytes."""
    mesh = sharding.make_mesh(fsdp=8)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    gather = jax.jit(lambda x: x * 2, out_shardings=sharding.replicated(mesh))
    compiled = gather.lower(jax.ShapeDtypeStruct((128, 32), jnp.float32, sharding=split)).compile()
    costs = plan.compiled_costs(compiled).hlo
    assert costs.collective_bytes == {"all-gather": 128 * 32 * 4}
    assert costs.collective_counts == {"all-gather": 1}


# ------------------------------------------------------------------------------ small plans
def test_small_dpo_plan_matches_a_real_run_and_counts_flops_exactly():
    """data=2, fsdp=2, tensor=2. The state as a run creates and places it (``shard_state``), the
    batch as ``shard_batch`` splits it: the same shardings as the planned inputs, and on every
    device exactly the bytes the plan reports. Without remat the compiled dots are the model
    FLOPs (3 policy forwards, 1 reference forward) plus the chunked head's and the attention
    scores' recomputation;
    cost_analysis counts one scanned layer."""
    planned = plan_cli.compile_plan(_config(step="dpo", mesh="data=2,fsdp=2,tensor=2"))
    result, built = planned.report, planned.built
    causal_lm = CausalLM(plan_cli.model_config(_config()))
    mesh = jax.tree.leaves(built.state)[0].sharding.mesh
    optimizer = steps.make_optimizer(**_config().optimizer_options())

    def init(key):  # as jaxalign dpo creates it
        params = init_params(causal_lm, key)
        return steps.create_train_state(params, optimizer, key, ref_params=params)

    state = sharding.shard_state(jax.jit(init)(jax.random.key(0)), mesh,
                                 {"params": causal_lm, "ref_params": causal_lm})
    ids = np.ones((4, 64), np.int32)
    batch = sharding.shard_batch({f"{side}_{name}": ids for side in ("chosen", "rejected")
                                  for name in ("ids", "attention_mask", "completion_mask")}, mesh)
    real = jax.tree.leaves((state, batch))
    assert [x.sharding for x in real] == [x.sharding for x in jax.tree.leaves(
        (built.state, *built.args))]
    per_device = {d: 0 for d in mesh.devices.flat}
    for array in real:
        for shard in array.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    mem = result["bytes_per_device"]
    assert set(per_device.values()) == {mem["arguments"]}  # exact, on every device
    parts = ("params", "optimizer_state", "reference_params", "other", "batch")
    assert sum(mem[k] for k in parts) == mem["arguments"]
    # XLA's own count leaves out inputs the step never reads (here one boolean scalar)
    assert 0 <= mem["arguments"] - mem["arguments_xla"] <= 8
    flops = result["flops_per_device"]
    # The chunked LM head reads only the T - 1 = 63 positions that predict a token and
    # recomputes their logits in the backward pass: per row, the reference forward plus the
    # policy's forward, recomputation and two gradient matmuls are 5 x 63 head positions where
    # the model count has 4 x 64. Per device: 2 of the 8 rows (data x fsdp = 4) and half the
    # vocabulary (tensor = 2), 2 * D * V / 2 FLOPs per position (tiny: D = 64, V = 512).
    recompute = 2 * (5 * 63 - 4 * 64) * (2 * 64 * 512 // 2)
    # Dense attention's backward recomputes the policy's scores q kᵀ once per layer: 2 rows x
    # 64 x 64 positions x 32 head dims per device (4 heads of 16, tensor = 2) x 2 layers.
    recompute += 2 * 2 * 64 * 64 * (64 // 2) * 2
    assert flops["compiled"] == pytest.approx(flops["model"] + recompute, rel=1e-6)
    assert flops["cost_analysis"] < 0.9 * flops["compiled"]
    assert result["loops_without_trip_count"] == 0


_TEMP_SCRIPT = """
import ctypes, json, re, sys
import jax, numpy as np
from jaxalign.cli import plan as plan_cli
from jaxalign.cli.configs import PlanConfig
from jaxalign.cli.options import build

def status(field):  # bytes
    text = open("/proc/self/status").read()
    return int(re.search(field + r":\\s+(\\d+) kB", text).group(1)) * 1024

def placed(x):  # an array as a run holds it: that shape, dtype and layout (values cost nothing)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.device_put(jax.random.key(0), x.sharding)
    return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)

planned = plan_cli.compile_plan(build(PlanConfig, json.loads(sys.argv[1])))
inputs = jax.block_until_ready(jax.tree.map(placed, (planned.built.state, *planned.built.args)))
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
jax.block_until_ready(planned.compiled(*inputs))  # the planned program itself, run once
print(json.dumps({"planned_temp": planned.report["bytes_per_device"]["temp"],
                  "growth": status("VmHWM") - before}))
"""


def test_temp_bytes_are_within_a_quarter_of_the_measured_peak_growth():
    """One device, in a fresh process (no earlier test's freed memory to reuse): the peak RSS
    growth of the planned SFT program's first run (VmHWM reset just before it) against its
    planned temp bytes, ~0.2 GB here (activations of 32 x 256 tokens and the chunked LM head's
    [chunk, V / 2] buffers; no full-vocabulary logits)."""
    values = {**SMALL, "model_overrides": {"vocab_size": 16384}, "batch_size": 32,
              "max_length": 256, "step": "sft"}
    done = subprocess.run([sys.executable, "-c", _TEMP_SCRIPT, json.dumps(values)],
                          capture_output=True, text=True, check=False,
                          env=plan_cli._child_env(1))
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["planned_temp"] > 2**27
    assert measured["planned_temp"] == pytest.approx(measured["growth"], rel=0.25)


def test_ppo_plan_counts_the_decode_loop_and_every_model():
    config = _config(step="ppo", mesh="data=2", max_new_tokens=8, ppo_epochs=1,
                     num_minibatches=1, model_overrides={"vocab_size": 512, "n_layers": 1})
    result = plan_cli.plan_step(config)
    mem, flops = result["bytes_per_device"], result["flops_per_device"]
    assert {"value_params", "value_optimizer_state", "reward_params"} <= set(mem)
    assert mem["value_params"] == mem["reward_params"] < mem["params"]  # no LM head
    assert result["loops_without_trip_count"] == 1 and result["assumed_trip_count"] == 7
    # 7 decode steps, the scoring passes and the update: the compiled dots x trip counts equal
    # the analytic count (the sampler's small inverse-CDF matmuls are all it leaves out)
    assert flops["compiled"] == pytest.approx(flops["model"], rel=0.01)


# ------------------------------------------------------------------------------ Llama-3-8B
@pytest.mark.parametrize("mesh", ["fsdp=8", "fsdp=4,tensor=2"])
def test_llama_3_8b_parameter_and_optimizer_bytes_per_device(mesh, tmp_path):
    """The command end to end (its own 8-device subprocess): bytes per device equal params ×
    4 B / 8 shards within 1% (norm scales are split over fsdp only), Adam's two moments twice
    that, and they add up to XLA's argument bytes."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from jaxalign.cli import main; sys.exit(main())",
         "plan", "dpo", "--model", "llama-3-8b", "--mesh", mesh, "--batch-size", "8",
         "--max-length", "512", "--dtype", "bfloat16", "--remat", "full", "--json"],
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    n = plan.parameter_count(plan.MODEL_SHAPES["llama-3-8b"])
    assert result["parameters"] == n and 8.0e9 < n < 8.1e9
    mem = result["bytes_per_device"]
    assert mem["params"] == pytest.approx(n * 4 / 8, rel=0.01)
    assert mem["reference_params"] == mem["params"]
    assert mem["optimizer_state"] == pytest.approx(2 * n * 4 / 8, rel=0.01)
    parts = ("params", "optimizer_state", "reference_params", "other", "batch")
    assert sum(mem[k] for k in parts) == mem["arguments"]
    assert 0 <= mem["arguments"] - mem["arguments_xla"] <= 8
    flops = result["flops_per_device"]
    # remat recomputes; cost_analysis counts one of the 32 scanned layers (the LM head is outside)
    assert flops["compiled"] > flops["model"] > 4 * flops["cost_analysis"]
    assert {row["accelerator"] for row in result["accelerators"]} == {
        chip.name for chip in plan.ACCELERATORS}


# ------------------------------------------------------------------------------ the command
def test_plan_command_line(tmp_path):
    command, config = cli.parse_args(["plan", "ppo", "--mesh", "fsdp=4", "--max-new-tokens", "64"])
    assert command == "plan" and config.step == "ppo" and config.rlhf.max_new_tokens == 64
    assert cli.parse_args(["plan"])[1].step == "dpo"
    with pytest.raises(SystemExit):
        cli.parse_args(["plan", "kto"])
    options = tmp_path / "plan.yaml"
    options.write_text("step: ppo\nmesh: fsdp=2\nremat: full\n")
    from_file = cli.parse_args(["plan", "--config", str(options)])[1]
    assert (from_file.step, from_file.mesh, from_file.compute.remat) == ("ppo", "fsdp=2", "full")
    assert cli.parse_args(["plan", "sft", "--config", str(options)])[1].step == "sft"  # flag wins
    assert plan_cli._child_env(64)["XLA_FLAGS"].endswith(
        "--xla_force_host_platform_device_count=64")  # replaces the 8 this session forced


def test_model_sources(tmp_path):
    llama = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
             "rope_theta": 500000.0, "max_position_embeddings": 512}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(llama))
    cfg = plan_cli.model_config(_config(model=str(tmp_path / "hf"), model_overrides={},
                                        dtype="bfloat16", remat="full"))
    assert (cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.rope_theta) == (3, 64, 1000, 5e5)
    assert cfg.dtype == jnp.bfloat16 and cfg.remat and cfg.remat_policy == "nothing"
    assert cfg.scan_layers
    fields = tmp_path / "shape.json"
    fields.write_text(json.dumps({"vocab_size": 300, "n_layers": 1}))
    assert plan_cli.model_config(_config(model=str(fields), model_overrides={})).vocab_size == 300
    named = plan_cli.model_config(_config(model="qwen2.5-7b", model_overrides={}))
    assert named.qkv_bias and math.isclose(plan.parameter_count(named) / 1e9, 7.6, rel_tol=0.01)
    with pytest.raises(RunError, match="not a named shape"):
        plan_cli.model_config(_config(model=str(tmp_path / "missing")))
