"""`jaxalign ppo`, `rs` and `label` on the sft and rm runs of test_cli.py: PPO learns against the
reward model, resumes exactly, runs on a data-parallel mesh; rejection sampling logs a reward
per round; the judge's labels are soft, in [0.5, 1], and mirror when the responses swap.

Each compilation of the RLHF iteration costs ~15 s on CPU, so one PPO configuration is compiled
once (the uninterrupted, interrupted and resumed runs share it) plus once on the mesh.
"""

import json
import math
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxalign import cli, train
from jaxalign.cli import run_dir
from test_cli import WORDS, _metrics, _Tee, _write_jsonl, data, runs  # noqa: F401  (fixtures)

PPO_STEPS = 16
RESUME_AT = 6
RLHF_METRICS = {"score/mean", "score/std", "kl", "kl_coef", "entropy", "policy/clipfrac",
                "policy/approx_kl", "loss/policy", "loss/value", "loss/total", "value/clipfrac",
                "response_length", "eos_fraction", "return/mean", "advantage/mean", "grad_norm",
                "lr",
                # issue 17: the completion-length and per-side clip metrics of TRL / verl
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "policy/clipfrac_low", "policy/clipfrac_high",
                # with --samples-per-prompt 2: the share of prompt groups without reward signal
                "frac_reward_zero_std"}


def _ppo_flags(runs, prompts, out, *extra):
    return ["ppo", "--prompts", str(prompts), "--policy", str(runs("sft").out),
            "--reward", str(runs("rm").out), "--out", str(out), "--steps", str(PPO_STEPS),
            "--batch-size", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--lr", "3e-3", "--kl-coef", "0.01", "--save-every", "1000", "--no-progress", *extra]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    return _write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say {w}:"} for w in WORDS])


@pytest.fixture(scope="module")
def ppo_run(runs, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_ppo")
    with pytest.MonkeyPatch.context() as mp:
        stdout = _Tee(sys.stdout)
        mp.setattr(sys, "stdout", stdout)
        assert cli.main(_ppo_flags(runs, prompts, out)) == 0
    return SimpleNamespace(out=out, stdout=stdout.text)


# ------------------------------------------------------------------------------ ppo
def test_ppo_raises_the_reward_and_logs_the_rlhf_metrics(ppo_run, runs):
    out = ppo_run.out
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, PPO_STEPS + 1))
    assert set(metrics[0]) == RLHF_METRICS | {"step"}
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    scores = [m["score/mean"] for m in metrics]
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.2, scores
    assert all(m["kl_coef"] == pytest.approx(0.01) for m in metrics)  # no --kl-target: fixed
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts at the reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["final_score"] == pytest.approx(scores[-1])
    assert f"jaxalign ppo: {PPO_STEPS} iterations (to {PPO_STEPS}/{PPO_STEPS})" in ppo_run.stdout
    assert (out / "checkpoints" / str(PPO_STEPS)).is_dir() and any((out / "tb").iterdir())
    # the final policy is a causal LM like the SFT one it started from, with other weights
    model, params, info = run_dir.load_final(out)
    sft_model, sft_params, _ = run_dir.load_final(runs("sft").out)
    assert info["model_type"] == "causal_lm" and info["kind"] == "ppo"
    assert model.config == sft_model.config
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, sft_params)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_ppo_resume_gives_the_uninterrupted_metrics(ppo_run, runs, prompts, tmp_path, caplog):
    out = tmp_path / "resumed"
    with jax.log_compiles(True):  # the three runs share one compiled iteration
        assert cli.main(_ppo_flags(runs, prompts, out, "--stop-at", str(RESUME_AT))) == 0
        assert _metrics(out) == _metrics(ppo_run.out)[:RESUME_AT]
        assert not (out / "final").exists()
        with open(out / "metrics.jsonl", "a") as f:  # as if it crashed after the checkpoint
            f.write(json.dumps({"step": RESUME_AT + 1, "score/mean": -1.0}) + "\n")
        assert cli.main(_ppo_flags(runs, prompts, out, "--resume")) == 0
    assert not [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert _metrics(out) == _metrics(ppo_run.out)  # exactly equal floats, line by line
    assert json.loads((out / "summary.json").read_text())["start_step"] == RESUME_AT
    jax.tree.map(np.testing.assert_array_equal, run_dir.load_final(out)[1],
                 run_dir.load_final(ppo_run.out)[1])


def test_ppo_sigterm_checkpoints_the_iteration_and_resume_is_exact(ppo_run, runs, prompts,
                                                                   tmp_path, monkeypatch):
    # SIGTERM (what preemption sends) during iteration RESUME_AT: checkpoint, exit 143; the
    # sft/rm/dpo/... side is tests/test_preemption.py (subprocesses, SIGKILL too)
    import os, signal, threading  # noqa: E401, PLC0415

    from jaxalign.cli import run_log  # noqa: PLC0415

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    log = run_log.RunLog.log

    def log_then_sigterm(self, step, metrics, extra):
        record = log(self, step, metrics, extra)
        if step == RESUME_AT:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler
        return record

    out, before = tmp_path / "stopped", signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(run_log.RunLog, "log", log_then_sigterm)
    assert cli.main(_ppo_flags(runs, prompts, out)) == 143
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
    assert sorted(os.listdir(out / "checkpoints")) == [str(RESUME_AT)]
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    assert cli.main(_ppo_flags(runs, prompts, out, "--resume")) == 0
    assert _metrics(out) == _metrics(ppo_run.out)  # exactly equal floats, line by line


def test_ppo_on_a_data_parallel_mesh_matches_one_device(ppo_run, runs, prompts, tmp_path):
    out = tmp_path / "mesh"
    assert cli.main(_ppo_flags(runs, prompts, out, "--mesh", "data=2", "--stop-at", "2")) == 0
    # and resumes from its sharded checkpoint
    assert cli.main(_ppo_flags(runs, prompts, out, "--mesh", "data=2", "--stop-at", "3",
                               "--resume")) == 0
    for mine, theirs in zip(_metrics(out), _metrics(ppo_run.out)[:3], strict=True):
        for name, value in theirs.items():
            # clip fractions count tokens past a threshold: rounding may flip one of 64
            atol = 0.02 if "clipfrac" in name else 1e-4
            assert mine[name] == pytest.approx(value, rel=2e-3, abs=atol), name


def test_ppo_bad_inputs_exit_2_naming_the_problem(runs, prompts, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "Say sun:"}', '{"text": "x"}'])
    cases = [
        (("--prompts", str(bad)), f"{bad}:2: missing field 'prompt'"),
        (("--reward", str(runs("sft").out)), "holds a CausalLM; ppo needs the reward model"),
        (("--advantage", "rloo", "--samples-per-prompt", "1"), "samples_per_prompt >= 2"),
        (("--mesh", "data=3"), "batch_size (4) is not divisible by the mesh's data x fsdp = 3"),
        (("--mesh", "model=2"), "--mesh entry 'model=2' is not AXIS=N"),
        (("--policy", "huge"), "--policy 'huge' is neither a finished jaxalign run"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli.main(_ppo_flags(runs, prompts, out, *extra)) == 2, message  # last flag wins
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_ppo_options_parse_from_flags_and_config_file(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("steps: 7\nkl_target: 6\nvalue-clip: null\nadvantage: grpo\n")
    command, config = cli.parse_args(["ppo", "--config", str(path), "--kl-target", "none",
                                      "--samples-per-prompt", "4", "--mesh", "data=4,fsdp=2"])
    assert command == "ppo" and type(config).__name__ == "PPOConfig"
    assert (config.steps, config.rlhf.kl_target, config.rlhf.value_clip) == (7, None, None)
    assert (config.rlhf.advantage, config.rlhf.samples_per_prompt) == ("grpo", 4)
    assert config.mesh == "data=4,fsdp=2"
    rlhf = config.rlhf_config(eos_id=2, pad_id=0)
    assert (rlhf.eos_id, rlhf.pad_id, rlhf.kl_target) == (2, 0, None)
    assert type(train.kl_controller(rlhf)).__name__ == "FixedKLController"
    # the CLI's defaults are the library's: one definition of every RLHF setting
    assert cli.make_config({}, command="ppo").rlhf == train.RLHFConfig()
    with pytest.raises(cli.ConfigError, match="unknown config key 'beta'"):
        cli.make_config({"beta": 0.1}, command="ppo")


# ------------------------------------------------------------------------------ rs
def test_rs_logs_the_reward_per_round_and_saves_a_loadable_policy(runs, prompts, tmp_path):
    out = tmp_path / "rs"
    summary = cli.run_training("rs", {
        "prompts": prompts, "policy": runs("sft").out, "reward": runs("rm").out, "out": out,
        "n": 4, "rounds": 2, "steps_per_round": 2, "max_new_tokens": 8, "lr": 3e-3,
        "progress": False})
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m, entry in zip(metrics, summary["history"], strict=True):
        assert set(m) == {"step", "score/mean", "score/best", "loss", "lr"}
        assert m["score/mean"] == pytest.approx(entry["mean_score"])
        assert m["score/best"] >= m["score/mean"]  # the kept sample is the best of n
    model, params, info = run_dir.load_final(out)
    assert info["kind"] == "rs" and info["model_type"] == "causal_lm"
    sft_params = run_dir.load_final(runs("sft").out)[1]
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, sft_params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    assert summary == json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------ label
def _pairs(swapped=False):
    records = []
    for i, w in enumerate(WORDS[:5]):
        a, b = f" yes {w} good", f" no {w} bad bad"
        a, b = (b, a) if swapped else (a, b)
        names = ("chosen", "rejected") if i == 4 else ("response_a", "response_b")  # relabelled
        records.append({"prompt": f"Say {w}:", names[0]: a, names[1]: b})
    records.append({"prompt": "Say sun:", "response_a": " sun", "response_b": " sun"})
    return records


@pytest.mark.parametrize("judge", ["rm", "sft"])
def test_label_gives_soft_labels_that_mirror_when_the_responses_swap(runs, judge, tmp_path):
    constitution = tmp_path / "constitution.yaml"
    constitution.write_text("- Choose the more positive response.\n- Choose the shorter one.\n")
    labelled = {}
    for swapped in (False, True):
        pairs = _write_jsonl(tmp_path / f"pairs{swapped}.jsonl", _pairs(swapped))
        out = tmp_path / f"labels{swapped}.jsonl"
        assert cli.main(["label", "--judge", str(runs(judge).out), "--pairs", str(pairs),
                         "--constitution", str(constitution), "--out", str(out),
                         "--batch-size", "8", "--max-length", "64"]) == 0
        labelled[swapped] = [json.loads(line) for line in out.read_text().splitlines()]
    straight, swapped = labelled[False], labelled[True]
    assert len(straight) == 5  # the pair of identical responses carries no preference
    for mine, theirs in zip(straight, swapped, strict=True):
        assert 0.5 <= mine["p_chosen"] <= 1.0
        assert (mine["chosen"], mine["rejected"]) == (theirs["chosen"], theirs["rejected"])
        assert mine["p_chosen"] == pytest.approx(theirs["p_chosen"], abs=1e-6)
    if judge == "rm":  # the reward model learned that "yes ... good" is better
        assert all(r["chosen"].startswith(" yes") and r["p_chosen"] > 0.5 for r in straight)


def test_label_bad_record_exits_2_with_file_line_reason(runs, tmp_path, capsys):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [*_pairs()[:2], {"prompt": "x", "chosen": "a"}])
    out = tmp_path / "labels.jsonl"
    assert cli.main(["label", "--judge", str(runs("rm").out), "--pairs", str(pairs),
                     "--out", str(out)]) == 2
    assert f"{pairs}:3: missing field 'rejected'" in capsys.readouterr().err
    assert not out.exists()
