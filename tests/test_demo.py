"""``python -m jaxalign.demo --quick``: every stage runs (best-of-N and RLAIF included), the
report is complete, and a second run reuses every cached stage."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

METHODS = ("sft", "ppo", "dpo", "ipo", "orpo", "simpo", "kto")
METHOD_KEYS = ("gold_reward", "gold_reward_se", "kl_to_sft", "kl_to_sft_se", "win_rate_vs_sft",
               "win_rate_ci", "n", "examples", "hyperparameters")
REPO = Path(__file__).resolve().parents[1]


def _run_demo(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    # conftest forces 8 host devices; the demo runs on the one CPU device it would normally see
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxalign.demo", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - start


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_report(demo_runs):
    report = demo_runs["report"]
    assert report["quick"] is True and report["enforced"] is False
    for method in METHODS:
        entry = report["methods"][method]
        assert set(METHOD_KEYS) <= set(entry), (method, sorted(entry))
        for key in ("gold_reward", "gold_reward_se", "kl_to_sft", "kl_to_sft_se",
                    "win_rate_vs_sft"):
            assert _finite(entry[key]), (method, key, entry[key])
        low, high = entry["win_rate_ci"]
        assert 0.0 <= low <= entry["win_rate_vs_sft"] <= high <= 1.0
        assert entry["n"] == report["config"]["eval_prompts"]
    assert report["methods"]["sft"]["kl_to_sft"] == 0.0  # same parameters as the reference
    assert 0.0 <= report["reward_model"]["heldout_accuracy"] <= 1.0
    curve = report["ppo_curve"]
    assert len(curve["gold_reward"]) == report["config"]["ppo_iterations"]
    assert all(_finite(v) for v in curve["gold_reward"] + curve["kl_coef"])
    assert _finite(curve["improvement"]["improvement"])
    names = {t["name"] for t in report["targets"]}
    assert "reward_model.heldout_accuracy" in names and "orpo.win_rate_ci_low" in names
    assert "rlaif_dpo.win_rate_vs_sft" in names and "rlaif_dpo.win_rate_ci_low" in names
    assert {p["method"] for p in report["frontier"]} >= {"sft", "dpo", "ipo", "orpo", "simpo",
                                                         "kto"}
    _check_ai_feedback(report)


def _check_ai_feedback(report):
    """Best-of-N reference points and the RLAIF variant (issue 7's evaluation hooks)."""
    points = report["best_of_n"]
    assert [p["n"] for p in points] == [1, 4, 16]
    for point in points:
        n = point["n"]
        assert _finite(point["gold_reward"])
        assert point["prompts"] == report["config"]["eval_prompts"]
        low, high = point["win_rate_ci"]
        assert 0.0 <= low <= point["win_rate_vs_sft"] <= high <= 1.0
        assert point["kl_closed_form"] == pytest.approx(math.log(n) - (n - 1) / n)
    # the reward model picks the best of the first n of the same samples: its score never drops
    scores = [p["reward_model_score"] for p in points]
    assert scores == sorted(scores), scores
    bon_frontier = [p for p in report["frontier"] if p.get("kl_closed_form")]
    assert [(p["label"], p["kl_to_sft"]) for p in bon_frontier] == [
        (f"BoN n={p['n']}", p["kl_closed_form"]) for p in points]
    rlaif = report["rlaif"]
    assert 0.0 <= rlaif["label_agreement"] <= 1.0 and 0.0 <= rlaif["label_agreement_train"] <= 1.0
    # held-out agreement is the reward model's held-out accuracy: same judge, same pairs
    assert rlaif["label_agreement"] == pytest.approx(report["reward_model"]["heldout_accuracy"])
    assert rlaif["n_pairs"] == report["preferences"]["pairs_train"]
    assert rlaif["n_pairs_heldout"] == report["preferences"]["pairs_heldout"]
    assert set(METHOD_KEYS) <= set(rlaif["dpo"])
    assert _finite(rlaif["dpo"]["kl_to_sft"])
    assert rlaif["dpo"]["n"] == report["config"]["eval_prompts"]
    assert rlaif["dpo"]["hyperparameters"]["beta"] == report["config"]["dpo_beta"]


def _check_outputs(demo_runs):
    out = demo_runs["out"]
    for name in ("reward_curve.png", "frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    markdown = (out / "report.md").read_text()
    assert "| method | gold reward" in markdown and "| orpo |" in markdown
    lines = (out / "preferences" / "train.jsonl").read_text().splitlines()
    assert len(lines) == demo_runs["report"]["preferences"]["pairs_train"] > 0
    record = json.loads(lines[0])
    assert {"prompt", "chosen", "rejected"} <= set(record)
    assert record["chosen"] != record["rejected"]
    ai_lines = (out / "rlaif_labels" / "train.jsonl").read_text().splitlines()
    assert len(ai_lines) == len(lines)  # the same pairs, relabelled
    ai_records = [json.loads(line) for line in ai_lines]
    assert all(0.5 <= r["p_chosen"] <= 1.0 for r in ai_records)
    assert {r["prompt"] for r in ai_records} == {json.loads(line)["prompt"] for line in lines}
    assert "| rlaif_dpo |" in markdown and "## Best-of-N" in markdown and "| 16 |" in markdown
    stdout = demo_runs["first"].stdout
    assert "win vs SFT" in stdout and "Total wall time" in stdout
    for method in (*METHODS, "rlaif_dpo", "BoN n=16"):
        assert f"\n{method} " in stdout


def _check_second_run_reused_the_cache(demo_runs):
    first, second = demo_runs["report_first"], demo_runs["report"]
    assert first["stages"]["skipped"] == []
    assert second["stages"]["ran"] == []
    assert second["stages"]["skipped"] == first["stages"]["ran"]
    assert second["methods"] == first["methods"]  # identical numbers
    assert second["best_of_n"] == first["best_of_n"] and second["rlaif"] == first["rlaif"]
    assert "[cached] ppo" in demo_runs["second"].stdout
    assert demo_runs["second_s"] < demo_runs["first_s"] / 3, (demo_runs["first_s"],
                                                               demo_runs["second_s"])


def test_quick_demo_end_to_end(tmp_path):
    """One test (not a module fixture) so that pytest-xdist never runs the demo twice."""
    out = tmp_path / "demo"
    first, first_s = _run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report_first = json.loads((out / "report.json").read_text())
    second, second_s = _run_demo(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = {"out": out, "first": first, "second": second, "first_s": first_s,
            "second_s": second_s, "report_first": report_first,
            "report": json.loads((out / "report.json").read_text())}
    _check_report(runs)
    _check_outputs(runs)
    _check_second_run_reused_the_cache(runs)
