"""`jaxalign grpo` (and `ppo --reward-fn`): Python reward functions named on the command line,
reading the prompts file's columns, inside the one compiled RLHF step.

The policy is test_cli.py's tiny sft run (16 steps: still close to random bytes); the reward
counts the completion's characters that occur in the record's answer word (a dense reward that
reads a column), so GRPO can raise it within a few iterations.
"""

import json
import math
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.cli import run_dir
from jaxalign.cli.reward_fns import load_reward_fn, read_columns
from test_cli import WORDS, _metrics, _Tee, _write_jsonl, data, runs  # noqa: F401  (fixtures)

GRPO_STEPS = 12
RESUME_AT = 5
REWARD_MODULE = '''
def says_answer(prompts, completions, answer, **columns):
    """How many of the completion's characters occur in the record's answer word."""
    return [float(sum(ch in word for ch in text)) for text, word in zip(completions, answer)]
'''


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    (root / "grpo_test_rewards.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    yield "grpo_test_rewards:says_answer"
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_prompts")
    return _write_jsonl(root / "prompts.jsonl",
                        [{"prompt": f"Say {w}:", "word": w, "level": i} for i, w in
                         enumerate(WORDS)])


def _grpo_flags(runs, prompts, out, reward, *extra):
    return ["grpo", "--prompts", str(prompts), "--policy", str(runs("sft").out), "--out", str(out),
            "--steps", str(GRPO_STEPS), "--batch-size", "4", "--samples-per-prompt", "4",
            "--max-new-tokens", "8", "--lr", "3e-3", "--reward-fn", reward, "--answer-column",
            "word", "--save-every", "1000", "--no-progress", *extra]


@pytest.fixture(scope="module")
def grpo_run(runs, prompts, reward_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_grpo")
    with pytest.MonkeyPatch.context() as mp:
        stdout = _Tee(sys.stdout)
        mp.setattr(sys, "stdout", stdout)
        assert cli.main(_grpo_flags(runs, prompts, out, reward_module)) == 0
    return SimpleNamespace(out=out, stdout=stdout.text)


def test_grpo_raises_a_python_reward_and_logs_what_trl_users_look_for(grpo_run, runs):
    metrics = _metrics(grpo_run.out)
    assert [m["step"] for m in metrics] == list(range(1, GRPO_STEPS + 1))
    expected = {"rewards/says_answer/mean", "rewards/says_answer/std", "frac_reward_zero_std",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "policy/clipfrac_low", "policy/clipfrac_high"}
    assert expected <= set(metrics[0]), sorted(metrics[0])
    assert "loss/kl" not in metrics[0] and all(m["kl"] == 0.0 for m in metrics)  # β = 0
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    scores = [m["score/mean"] for m in metrics]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.3, scores
    np.testing.assert_allclose(scores, [m["rewards/says_answer/mean"] for m in metrics])
    summary = json.loads((grpo_run.out / "summary.json").read_text())
    assert summary["kind"] == "grpo" and summary["finished"]
    assert f"jaxalign grpo: {GRPO_STEPS} iterations" in grpo_run.stdout
    model, params, info = run_dir.load_final(grpo_run.out)
    assert info["kind"] == "grpo" and model.config == run_dir.load_final(runs("sft").out)[0].config


def test_grpo_resume_gives_the_uninterrupted_metrics(grpo_run, runs, prompts, reward_module,
                                                     tmp_path, caplog):
    out = tmp_path / "resumed"
    with jax.log_compiles(True):  # both runs share the compiled step (and its reward callback)
        assert cli.main(_grpo_flags(runs, prompts, out, reward_module, "--stop-at",
                                    str(RESUME_AT))) == 0
        assert cli.main(_grpo_flags(runs, prompts, out, reward_module, "--resume")) == 0
    assert not [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert _metrics(out) == _metrics(grpo_run.out)


def test_grpo_on_a_data_parallel_mesh_matches_one_device(grpo_run, runs, prompts,
                                                          reward_module, tmp_path):
    """On --mesh data=2 the reward callback runs per device shard (shard_map); the iterations
    are those of the one-device run."""
    out = tmp_path / "mesh"
    assert cli.main(_grpo_flags(runs, prompts, out, reward_module, "--mesh", "data=2",
                                "--stop-at", "2")) == 0
    for mine, theirs in zip(_metrics(out), _metrics(grpo_run.out)[:2], strict=True):
        for name in ("score/mean", "rewards/says_answer/mean", "frac_reward_zero_std",
                     "completions/mean_length", "entropy"):
            assert mine[name] == pytest.approx(theirs[name], rel=2e-3, abs=1e-4), name


def test_ppo_takes_reward_functions_too(runs, prompts, reward_module, tmp_path):
    """GAE with a value model started from the policy's trunk (there is no reward model)."""
    out = tmp_path / "ppo_fn"
    flags = ["ppo", "--prompts", str(prompts), "--policy", str(runs("sft").out), "--out",
             str(out), "--steps", "2", "--batch-size", "4", "--max-new-tokens", "8",
             "--reward-fn", reward_module, "--reward-fn",
             "jaxalign.rewards:length_penalty(coef=0.1)", "--reward-weights", "1,0.5",
             "--answer-column", "word", "--save-every", "1000", "--no-progress"]
    assert cli.main(flags) == 0
    metrics = _metrics(out)
    m = metrics[0]
    np.testing.assert_allclose(m["score/mean"], m["rewards/says_answer/mean"]
                               + 0.5 * m["rewards/length_penalty/mean"], rtol=1e-5)
    assert math.isfinite(m["loss/value"]) and m["loss/value"] > 0


def test_bad_reward_options_exit_2_naming_the_problem(runs, prompts, reward_module, tmp_path,
                                                      capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Say sun:", "word": "sun"},
                                                {"prompt": "Say moon:"}])
    cases = [
        (("--reward-fn", "no_such_module:f"), "cannot import no_such_module"),
        (("--reward-fn", "jaxalign.rewards:nothing"), "has no function 'nothing'"),
        (("--reward-fn", "jaxalign.rewards:format_reward(pattern=open('x'))"),
         "arguments must be key=literal pairs"),
        (("--reward-weights", "1,2"), "--reward-weights has 2 values for 1 --reward-fn"),
        (("--answer-column", "nope"), ":1: missing field 'nope' (--answer-column)"),
        (("--prompts", str(bad)), f"{bad}:2: missing field 'word' (--answer-column)"),
        (("--reward", str(runs("sft").out)), "pass --reward (a reward model) or --reward-fn"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli.main(_grpo_flags(runs, prompts, out, reward_module, "--steps", "1",
                                    *extra)) == 2, message
        assert message in capsys.readouterr().err
    # a function that needs a column the file does not have
    flags = [f for f in _grpo_flags(runs, prompts, tmp_path / "x", "jaxalign.rewards:math_answer")]
    flags = flags[:flags.index("--answer-column")] + flags[flags.index("--answer-column") + 2:]
    assert cli.main(flags) == 2
    assert "needs column(s) answer" in capsys.readouterr().err


def test_reward_options_parse_from_flags_and_config_file(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("reward_fn: [jaxalign.rewards:math_answer, 'm:f(a=1)']\nkl_coef: 0.04\n")
    command, config = cli.parse_args(["grpo", "--config", str(path), "--answer-column", "sol"])
    assert command == "grpo" and type(config).__name__ == "GRPOConfig"
    assert config.reward_fn == ["jaxalign.rewards:math_answer", "m:f(a=1)"]
    assert (config.rlhf.advantage, config.rlhf.kl_in, config.rlhf.kl_coef,
            config.rlhf.samples_per_prompt) == ("grpo", "loss", 0.04, 8)
    _, flags = cli.parse_args(["grpo", "--reward-fn", "a:b", "--reward-fn", "c:d"])
    assert flags.reward_fn == ["a:b", "c:d"]
    _, ppo = cli.parse_args(["ppo"])  # ppo's own defaults are unchanged
    assert ppo.rlhf.advantage == "gae" and ppo.reward_fn == []


def test_reward_fn_specs_and_columns(tmp_path):
    fn = load_reward_fn("jaxalign.rewards:overlong_penalty(max_length=10, cache_length=4)")
    assert fn(None, ["", ""], completion_ids=[[0] * 6, [0] * 8]) == [0.0, -0.5]
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1", "x": 3},
                                               {"prompt": "b", "answer": "2"}])
    assert read_columns(str(path), answer_column=None, on_bad_record="error") == {
        "answer": ["1", "2"], "x": [3, None]}
    assert read_columns(str(path), answer_column="x", on_bad_record="skip")["answer"] == [3]
