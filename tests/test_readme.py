"""The README's Python examples run as written (given the inputs they leave to the reader)."""

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block(heading: str, index: int = 0) -> str:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


def test_composing_the_losses_runs():
    rng = np.random.default_rng(0)
    B, T, V = 4, 6, 11
    mask = jnp.asarray(np.tril(np.ones((B, T)), k=2)[:, ::-1].copy(), jnp.float32)
    namespace = {
        "rewards": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "values": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "old_values": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "completion_mask": mask,
        "logps": jnp.asarray(-rng.random((B, T)), jnp.float32),
        "old_logps": jnp.asarray(-rng.random((B, T)), jnp.float32),
        "logits": jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32),
        "measured_kl": 3.0,
        "batch_size": B,
    }
    exec(_block("Composing the losses in your own JAX code"), namespace)  # noqa: S102
    assert math.isfinite(float(namespace["loss"]))
    assert namespace["kl_state"].coef > 0

    # and the DPO objective it defines, on a toy "model" (a lookup table of logits)
    table = jnp.asarray(rng.normal(size=(V, V)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    batch = {"chosen_ids": ids, "rejected_ids": ids[::-1],
             "chosen_completion_mask": mask, "rejected_completion_mask": mask[::-1]}
    ref = (jnp.zeros(B), jnp.zeros(B))
    value, grad = jax.value_and_grad(namespace["dpo_objective"])(
        table, ref, batch, lambda params, tokens: params[tokens])
    assert math.isfinite(float(value)) and float(jnp.abs(grad).sum()) > 0


def test_compiled_dpo_step_runs():
    rng = np.random.default_rng(1)
    P, T = 4, 16
    ids = rng.integers(3, 4096, (2, P, T)).astype(np.int32)
    completion = np.zeros((P, T), np.int32)
    completion[:, 6:] = 1
    batch = {"chosen_ids": ids[0], "rejected_ids": ids[1],
             "chosen_attention_mask": np.ones((P, T), np.int32),
             "rejected_attention_mask": np.ones((P, T), np.int32),
             "chosen_completion_mask": completion, "rejected_completion_mask": completion}
    namespace = {"jax": jax, "batch": batch}
    exec(_block("Compiled steps"), namespace)  # noqa: S102
    metrics = namespace["metrics"]
    assert math.isfinite(float(metrics["loss"]))
    np.testing.assert_allclose(metrics["loss"], np.log(2), rtol=1e-5)  # policy == reference
    assert {"rewards/chosen", "rewards/accuracies"} <= set(metrics)


def test_loss_family_examples_build_steps():
    """The second block of "Compiled steps" (loss combinations, SimPO, TR-DPO, KTO) runs with
    the model and optimiser of the first."""
    from jaxalign import train
    from jaxalign.models import CausalLM, get_config

    namespace = {"train": train, "model": CausalLM(get_config("tiny")),
                 "opt": train.make_optimizer(1e-3, total_steps=10)}
    exec(_block("Compiled steps", 1), namespace)  # noqa: S102
    assert all(isinstance(namespace[name], train.CompiledStep) for name in ("step", "kto"))


def test_every_python_block_is_checked_or_compiles():
    assert len(BLOCKS) >= 3
    for code in BLOCKS:
        compile(code, "README.md", "exec")  # at least valid Python


def test_verifiable_reward_grpo_example_runs():
    """The GRPO block of "Verifiable rewards" with a tiny model and a word-level tokenizer:
    Python rewards (with a column) inside the compiled step, their metrics logged."""
    from test_text_rewards import CFG, word_tokenizer

    from jaxalign.models import CausalLM, init_params

    policy = CausalLM(CFG)
    ids = np.tile(np.array([[0, 0, 3, 4], [0, 5, 6, 8]], np.int32), (2, 1))
    namespace = {"policy": policy, "policy_params": init_params(policy, jax.random.key(0)),
                 "tok": word_tokenizer(), "answers": ["7", "9", "11", "13"], "ids": ids,
                 "mask": (ids > 0).astype(np.int32), "rows": np.arange(4, dtype=np.int32),
                 "key": jax.random.key(1)}
    exec(_block("Verifiable rewards: GRPO with Python reward functions"), namespace)  # noqa: S102
    metrics = namespace["metrics"]
    assert {"rewards/math_answer/mean", "rewards/format_reward/mean", "frac_reward_zero_std",
            "completions/clipped_ratio"} <= set(metrics)
    assert namespace["state"].ref_params is None  # beta = 0: no reference model kept
