"""The math demo (``python -m jaxalign.demo --task math``): the task keeps its held-out pairs
out of everything the model sees before evaluation, its completions are what the verifiable
reward checks, and ``--quick`` runs every stage, writes a complete report and reuses its cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxalign import rewards
from jaxalign.demo import math_task

REPO = Path(__file__).resolve().parents[1]


def test_pair_splits_are_disjoint_and_cover_every_pair():
    splits = math_task.split_pairs(0, max_operand=15, sft_pairs=24, heldout_fraction=0.3)
    sets = {name: set(pairs) for name, pairs in splits.items()}
    assert sum(map(len, sets.values())) == 256 == len(set.union(*sets.values()))
    assert len(sets["heldout"]) == 77 and len(sets["sft"]) == 24


def test_held_out_pairs_appear_only_as_equations_before_evaluation():
    splits = math_task.split_pairs(0, max_operand=15, sft_pairs=24, heldout_fraction=0.3)
    worked = splits["sft"] + splits["rl"]
    rng = np.random.default_rng(0)
    docs = [math_task.pretraining_document(rng, worked, max_operand=15, worked_share=0.5)
            for _ in range(400)]
    questions = [d for d in docs if d.startswith("Q: ")]
    assert 120 < len(questions) < 280  # about half the documents are worked questions
    heldout = {f"Solution: {math_task.equation(a, b)}" for a, b in splits["heldout"]}
    assert not any(doc.split("A: ")[1] in heldout for doc in questions)
    equations = [d for d in docs if not d.startswith("Q: ")]
    assert all(len(d.splitlines()) == 4 for d in equations)


def test_the_reward_checks_worked_and_terse_answers():
    for a, b in [(13, 7), (0, 0), (15, 15)]:
        question = math_task.ask(a, b, np.random.default_rng(a))
        assert str(a) in question and str(b) in question
        completions = [math_task.worked_text(a, b), math_task.terse_text(a, b),
                       math_task.worked_text(a, b + 1)]
        assert rewards.math_answer([question] * 3, completions, answer=[str(a + b)] * 3) == [
            1.0, 1.0, 0.0]
    record = math_task.problems([(2, 3)], 1, seed=0)[0].record()
    assert record["answer"] == "5" and record["prompt"].endswith("\nA:")


@pytest.mark.slow
def test_quick_math_demo_writes_the_report_and_reuses_its_cache(tmp_path):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()  # one CPU device, as the demo normally sees
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    command = [sys.executable, "-m", "jaxalign.demo", "--task", "math", "--quick", "--out",
               str(tmp_path)]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quick"] is True and report["enforced"] is False
    for name in ("sft", "grpo", "dr_grpo", "rloo"):
        entry = report["heldout"][name]
        for low, high in (entry["accuracy_ci"], entry["accuracy_ci_pairs"]):
            assert 0.0 <= low <= entry["accuracy"] <= high <= 1.0
        assert 0.0 <= entry["sampled_accuracy"] <= 1.0 and entry["n"] == 64
    for name in ("grpo", "dr_grpo", "rloo"):
        curve = report["rl"][name]["curve"]
        assert curve["iteration"] == [0, 2, 4] and len(curve["heldout_greedy"]) == 3
        assert report["rl"][name]["config"]["advantage"] == name
        assert "rewards/math_answer/mean" in report["rl"][name]["final_metrics"]
    names = [t["name"] for t in report["targets"]]
    assert names == ["grpo.accuracy_gain", "grpo.accuracy_over_sft", "grpo.accuracy_ci_low",
                     "wall_time_s"]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Held-out exact-match accuracy" in markdown and "| dr_grpo |" in markdown
    assert "before (SFT) and after (GRPO)" in markdown
    assert (tmp_path / "accuracy_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "data" / "rl_prompts.jsonl").read_text().splitlines()[0]).keys() \
        == {"prompt", "answer"}  # what `jaxalign grpo --answer-column answer` reads
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0
    assert "8 stage(s) reused" in second.stdout, second.stdout[-2000:]


def test_pair_bootstrap_is_wider_than_the_prompt_bootstrap_when_wordings_agree():
    from jaxalign.demo.math_report import pair_bootstrap_ci
    from jaxalign.evaluate import bootstrap_ci

    pairs = [(i, 0) for i in range(40) for _ in range(5)]  # 40 pairs x 5 wordings
    correct = np.asarray([float(a % 2) for a, _ in pairs])  # a pair is right in every wording
    low, high = pair_bootstrap_ci(correct, pairs, seed=0)
    p_low, p_high = bootstrap_ci(correct, seed=0)
    assert low < 0.5 < high and high - low > 1.5 * (p_high - p_low)
    assert pair_bootstrap_ci(np.ones(200), pairs, seed=0) == (1.0, 1.0)
