"""Python reward functions on text inside the one-jit RLHF step (``reward_fns=[...]``).

The same reward written in Python (on decoded text, through ``jax.pure_callback``) and in JAX
(on token ids) gives the same iteration, on one device and on a ``data=2, fsdp=2`` mesh;
dataset columns reach the functions by each prompt's ``index``; weights, ``None`` values and
bad return values behave as documented; with two processes each host scores only its rows.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models as tokenizer_models, pre_tokenizers

from jaxalign import sharding, train
from jaxalign.models import CausalLM, get_config, init_params
from jaxalign.tokenizer import Tokenizer
from jaxalign.train import rlhf
from jaxalign.train.text_rewards import text_rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_config("tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                 d_ff=64, max_len=32)
TARGET = 7
BATCH = 8


def word_tokenizer(vocab_size: int = 32) -> Tokenizer:
    """Token ``i ≥ 3`` decodes to the word ``t{i}``; 0/1/2 are <pad>/<bos>/<eos> (dropped)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = tokenizers.Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return Tokenizer(backend)


def count_target_text(prompts, completions, **columns):
    return [text.split().count(f"t{TARGET}") for text in completions]


def count_target_ids(tokens, mask):
    return jnp.sum((tokens == TARGET) * mask, axis=1).astype(jnp.float32)


def _prompts(batch=BATCH):
    ids = np.tile(np.array([[0, 0, 3, 4], [0, 5, 6, 8]], np.int32), (batch // 2, 1))
    return {"prompt_ids": ids, "prompt_mask": (ids > 0).astype(np.int32)}


CONFIG = rlhf.RLHFConfig(max_new_tokens=8, advantage="grpo", samples_per_prompt=4, eos_id=2,
                         kl_coef=0.05, kl_in="loss", ppo_epochs=1, num_minibatches=2)


def _run(config=CONFIG, *, mesh=None, prompts=None, iterations=2, return_rollouts=False,
         **reward):
    opt = train.make_optimizer(3e-3, total_steps=10, skip_nonfinite=False)
    policy = CausalLM(CFG)
    state = rlhf.init_rlhf_state(config, init_params(policy, jax.random.key(0)), opt)
    step = rlhf.make_rlhf_step(policy, None, None, config, policy_optimizer=opt, mesh=mesh,
                               return_rollouts=return_rollouts, **reward)
    prompts = _prompts() if prompts is None else prompts
    if mesh is not None:
        state = rlhf.shard_rlhf_state(state, mesh, policy=policy)
        prompts = sharding.shard_batch(prompts, mesh)
    outputs = []
    for i in range(iterations):
        state, *rest = step(state, prompts, jax.random.key(i))
        outputs.append(jax.device_get(rest))
    return outputs, step


@pytest.mark.parametrize("layout", [None, {"data": 2, "fsdp": 2}])
def test_python_reward_equals_the_same_reward_in_jax(layout):
    mesh = None if layout is None else sharding.make_mesh(**layout, devices=jax.devices()[:4])
    via_text, step = _run(mesh=mesh, reward_fns=[count_target_text], tokenizer=word_tokenizer())
    via_jax, _ = _run(mesh=mesh, reward_fn=count_target_ids)
    for (text_metrics,), (jax_metrics,) in zip(via_text, via_jax):
        assert set(text_metrics) == set(jax_metrics) | {"rewards/count_target_text/mean",
                                                       "rewards/count_target_text/std"}
        for name, value in jax_metrics.items():
            np.testing.assert_array_equal(text_metrics[name], value, err_msg=name)
        np.testing.assert_allclose(text_metrics["rewards/count_target_text/mean"],
                                   jax_metrics["score/mean"], rtol=1e-6)
    assert via_text[0][0]["score/std"] > 0  # the reward varied, so the comparison means something
    assert step.jitted._cache_size() == 1  # still one compiled step


def test_columns_reach_the_reward_by_index_and_weights_combine():
    """Row i's reference (column ``answer``) is looked up by ``prompts["index"]``; the score is
    the weighted sum over functions, skipping ``None``."""
    seen = []

    def has_answer(prompts, completions, answer, completion_ids, **columns):
        seen.append((list(answer), [len(ids) for ids in completion_ids]))
        return [float(f"t{a}" in text.split()) for a, text in zip(answer, completions)]

    def sometimes(prompts, completions, **columns):
        return [None if i % 2 else 2.0 for i in range(len(completions))]

    answers = [str(a) for a in range(3, 3 + 20)]
    prompts = {**_prompts(), "index": np.arange(10, 10 + BATCH, dtype=np.int32)}
    (out,), _ = _run(prompts=prompts, iterations=1, return_rollouts=True,
                     reward_fns=[has_answer, sometimes], reward_weights=[1.0, 0.5],
                     tokenizer=word_tokenizer(), reward_columns={"answer": answers})
    metrics, rollouts = out
    expected_answers = np.repeat(answers[10:10 + BATCH], CONFIG.samples_per_prompt).tolist()
    assert seen[0][0] == expected_answers  # each sample of prompt i sees answer[index[i]]
    np.testing.assert_array_equal(seen[0][1], rollouts["completion_mask"].sum(1))
    texts = word_tokenizer().decode_batch(rollouts["completion_ids"],
                                          attention_mask=rollouts["completion_mask"])
    hit = np.array([f"t{a}" in t.split() for a, t in zip(expected_answers, texts)], np.float32)
    bonus = np.where(np.arange(len(texts)) % 2, 0.0, 1.0)  # 0.5 · 2 where it applies
    np.testing.assert_allclose(rollouts["scores"], hit + bonus, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/sometimes/mean"], 2.0)  # over rows it applied to
    np.testing.assert_allclose(metrics["rewards/has_answer/mean"], hit.mean(), rtol=1e-6)


def test_bad_reward_functions_are_named():
    tokenizer = word_tokenizer()
    short = lambda prompts, completions, **c: [0.0]  # noqa: E731
    with pytest.raises(Exception, match="returned 1 values for 32 completions"):
        _run(iterations=1, reward_fns=[short], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="prompts\\['index'\\]"):
        _run(iterations=1, reward_fns=[count_target_text], tokenizer=tokenizer,
             reward_columns={"answer": ["1"] * BATCH})
    with pytest.raises(ValueError, match="need a tokenizer"):
        _run(iterations=1, reward_fns=[count_target_text])
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        text_rewards([count_target_text], tokenizer, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="exactly one of reward"):
        _run(iterations=1, reward_fns=[count_target_text], reward_fn=count_target_ids,
             tokenizer=tokenizer)


def test_duplicate_function_names_get_suffixes():
    rewards = text_rewards([count_target_text, count_target_text], word_tokenizer())
    assert rewards.names == ("count_target_text", "count_target_text_2")


# ------------------------------------------------------------------ two processes
_WORKER = textwrap.dedent("""
    import json, os, sys
    nproc, pid, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
    sys.path.insert(0, os.path.join(root, "tests"))
    import jax
    from jaxalign import distributed
    if nproc > 1:
        distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    import numpy as np
    from jaxalign import sharding, train
    from jaxalign.models import CausalLM, init_params
    from jaxalign.train import rlhf
    from test_text_rewards import CFG, CONFIG, count_target_text, word_tokenizer
    seen = []
    def counted(prompts, completions, answer, **columns):
        seen.extend(answer)
        return count_target_text(prompts, completions)
    policy = CausalLM(CFG)
    opt = train.make_optimizer(3e-3, total_steps=10, skip_nonfinite=False)
    state = rlhf.init_rlhf_state(CONFIG, init_params(policy, jax.random.key(0)), opt)
    mesh = sharding.make_mesh(data=2, fsdp=2)
    step = rlhf.make_rlhf_step(policy, None, None, CONFIG, policy_optimizer=opt, mesh=mesh,
                               reward_fns=[counted], tokenizer=word_tokenizer(),
                               reward_columns={"answer": [str(i) for i in range(8)]})
    state = rlhf.shard_rlhf_state(state, mesh, policy=policy)
    ids = np.tile(np.array([[0, 0, 3, 4], [0, 5, 6, 8]], np.int32), (4, 1))
    rows = slice(pid * 8 // nproc, (pid + 1) * 8 // nproc)   # this process's prompts
    local = {"prompt_ids": ids[rows], "prompt_mask": (ids[rows] > 0).astype(np.int32),
             "index": np.arange(8, dtype=np.int32)[rows]}
    prompts = sharding.shard_batch(local, mesh)
    out = []
    for i in range(2):
        state, metrics = step(state, prompts, jax.random.key(i))
        out.append({k: float(v) for k, v in metrics.items()})
    print("RESULT " + json.dumps({"metrics": out, "seen": sorted(set(seen)),
                                  "rows_scored": len(seen), "processes": jax.process_count()}))
""")


def _result(output):
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_two_processes_score_their_own_rows_and_equal_one_process(tmp_path):
    from test_sharding import _free_port

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), "2", str(i), port, ROOT], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, str(script), "1", "0", "0", ROOT], env=env,
                            capture_output=True, text=True, timeout=600)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    one, two = _result(single.stdout + single.stderr), [_result(o) for o in outputs]
    k = CONFIG.samples_per_prompt
    assert one["processes"] == 1 and one["rows_scored"] == 2 * 8 * k  # 2 iterations, all rows
    for pid, result in enumerate(two):
        assert result["processes"] == 2
        assert result["rows_scored"] == 2 * 4 * k  # each host scored only its 4 prompts' rows
        assert result["seen"] == [str(i) for i in range(4 * pid, 4 * pid + 4)]
        for a, b in zip(result["metrics"], one["metrics"]):
            for name in a:
                atol = 0.05 if "clip" in name else 1e-5
                np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=atol, err_msg=name)
