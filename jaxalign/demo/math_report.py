"""The math demo's targets, ``report.json``, ``report.md`` and ``accuracy_curve.png``.

Targets (checked by every run, enforced — exit status 1 — without ``--quick``), on the held-out
prompts (pairs never asked before evaluation), greedy decoding, exact match of the final number:

* GRPO's accuracy minus the SFT model's ≥ 0.30 (30 points);
* GRPO's accuracy ≥ 2 × the SFT model's;
* the lower end of GRPO's bootstrap 95% CI (over prompts) > the SFT model's accuracy;
* the whole run (imports, compilation and every stage) ≤ 240 s of wall time.

``dr_grpo`` and ``rloo``, trained on the same budget, are reported beside GRPO, not targets.
The machine's load average at the start and end is recorded: the time target assumes the 2
cores are not shared.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from jaxalign.plots import plot_curves

__all__ = ["comparison_lines", "pair_bootstrap_ci", "summary", "target_lines", "write_report"]

GAIN_TARGET = 0.30
RATIO_TARGET = 2.0
WALL_TARGET_S = 240.0
MAIN = "grpo"


def pair_bootstrap_ci(correct: np.ndarray, pairs: list[tuple[int, int]], *, seed: int,
                      n_resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the accuracy resampling whole pairs (a cluster
    bootstrap: the wordings of one pair are not independent prompts)."""
    keys = sorted(set(pairs))
    index = {key: i for i, key in enumerate(keys)}
    group = np.asarray([index[p] for p in pairs])
    hits = np.bincount(group, weights=correct, minlength=len(keys))
    counts = np.bincount(group, minlength=len(keys))
    draws = np.random.default_rng(seed).integers(0, len(keys), (n_resamples, len(keys)))
    accuracy = hits[draws].sum(1) / counts[draws].sum(1)
    low, high = np.quantile(accuracy, [0.025, 0.975])
    return float(low), float(high)


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    sft = report["heldout"]["sft"]["accuracy"]
    main = report["heldout"][MAIN]
    targets = []

    def add(name, value, threshold, passed):
        targets.append({"name": name, "value": float(value), "threshold": threshold,
                        "passed": bool(passed)})

    add(f"{MAIN}.accuracy_gain", main["accuracy"] - sft, f">= {GAIN_TARGET}",
        main["accuracy"] - sft >= GAIN_TARGET)
    add(f"{MAIN}.accuracy_over_sft", main["accuracy"] / max(sft, 1e-9), f">= {RATIO_TARGET}",
        main["accuracy"] >= RATIO_TARGET * sft and main["accuracy"] > 0)
    add(f"{MAIN}.accuracy_ci_low", main["accuracy_ci"][0], f"> sft accuracy {sft:.3f}",
        main["accuracy_ci"][0] > sft)
    add("wall_time_s", report["total_wall_s"], f"<= {WALL_TARGET_S:g}",
        report["total_wall_s"] <= WALL_TARGET_S)
    return targets


def _policies(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The evaluated policies (``sft`` and each estimator) of ``report["heldout"]``."""
    return {k: v for k, v in report["heldout"].items() if isinstance(v, dict)}


def target_lines(report: dict[str, Any]) -> list[str]:
    return [f"{'PASS' if t['passed'] else 'FAIL'}  {t['name']:<26} {t['value']:8.3f}  "
            f"(target {t['threshold']})" for t in report["targets"]]


def comparison_lines(report: dict[str, Any]) -> list[str]:
    """One row per policy: held-out greedy accuracy [95% CI], sampled accuracy, RL time."""
    rows = [f"{'policy':<8} {'accuracy':>8} {'95% CI':>16} {'sampled':>8} {'RL s':>6}"]
    for name, entry in _policies(report).items():
        low, high = entry["accuracy_ci"]
        seconds = report["rl"].get(name, {}).get("rl_seconds")
        rows.append(f"{name:<8} {entry['accuracy']:8.3f} [{low:.3f}, {high:.3f}] "
                    f"{entry['sampled_accuracy']:8.3f} {'' if seconds is None else f'{seconds:6.1f}'}")
    return rows


def _plot(report: dict[str, Any], path: str) -> None:
    curves = {name: (run["curve"]["iteration"], run["curve"]["heldout_greedy"])
              for name, run in report["rl"].items()}
    plot_curves(curves, path, baseline=("SFT", report["heldout"]["sft"]["accuracy"]),
                xlabel="RL iteration", ylabel="held-out exact-match accuracy (greedy)",
                title="math demo: verifiable reward only")


def _samples(report: dict[str, Any]) -> list[str]:
    heldout = report["heldout"]
    lines = ["| prompt | answer | SFT | GRPO |", "|---|---|---|---|"]
    for i, (prompt, answer) in enumerate(zip(heldout["prompts"], heldout["answers"])):
        sft, main = heldout["sft"]["completions"][i], heldout[MAIN]["completions"][i]
        cell = lambda text: text.strip().replace("\n", " ⏎ ").replace("|", "\\|")  # noqa: E731
        lines.append(f"| {cell(prompt)} | {answer} | {cell(sft)} | {cell(main)} |")
    return lines


def _markdown(report: dict[str, Any]) -> str:
    cfg, sft = report["config"], report["heldout"]["sft"]
    lines = [
        "# jaxalign demo: GRPO on verifiable math", "",
        f"Quick mode: {report['quick']}. Wall time {report['total_wall_s']:.1f} s "
        f"({len(report['stages']['skipped'])} stage(s) reused from the cache); load average "
        f"{report['load_average']['start']:.2f} at the start, "
        f"{report['load_average']['end']:.2f} at the end ({os.cpu_count()} CPUs).", "",
        f"Additions a + b with 0 ≤ a, b ≤ {cfg['max_operand']}, as arithmetic or word problems; "
        f"the reward is `jaxalign.rewards.math_answer` (last number = a + b) through "
        f"`jax.pure_callback` inside the one-jit step, nothing else. Pretraining: "
        f"{cfg['pretrain_steps']} steps on documents of equations (every pair) and worked "
        f"questions (pairs outside the held-out set). SFT warm-up: {cfg['sft_steps']} steps on "
        f"{report['data']['sft_examples']} formatted examples, of which "
        f"{report['data']['sft_worked_examples']} work the problem and the rest only state the "
        f"answer. RL: {cfg['rl_iterations']} iterations × {cfg['rl_prompts']} prompts × "
        f"{cfg['samples']} samples, lr {cfg['rl_lr']}, β = 0, one update per batch, the same "
        f"for every estimator. Held-out: {sft['n']} prompts over "
        f"{report['data']['heldout']} pairs never asked before.", "",
        "## Held-out exact-match accuracy", "",
        "| policy | accuracy (greedy) | 95% CI (bootstrap over prompts) | 95% CI (over pairs) |"
        " sampled (T = 1) | RL seconds |", "|---|---|---|---|---|---|"]
    for name, entry in _policies(report).items():
        seconds = report["rl"].get(name, {}).get("rl_seconds")
        pairs = entry["accuracy_ci_pairs"]
        lines.append(f"| {name} | {entry['accuracy']:.3f} | [{entry['accuracy_ci'][0]:.3f}, "
                     f"{entry['accuracy_ci'][1]:.3f}] | [{pairs[0]:.3f}, {pairs[1]:.3f}] | "
                     f"{entry['sampled_accuracy']:.3f} | "
                     f"{'' if seconds is None else f'{seconds:.1f}'} |")
    lines += ["", "The prompts are the held-out pairs in several wordings each; the interval over "
              "pairs resamples whole pairs (a cluster bootstrap) and is the more conservative "
              "one. The targets use the one over prompts, as the demo's other reports do.", "",
              "## Targets", "", "| target | value | threshold | result |",
              "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']:.3f} | {t['threshold']} | "
              f"{'pass' if t['passed'] else 'FAIL'} |" for t in report["targets"]]
    lines += ["", "![accuracy curve](accuracy_curve.png)", "",
              "## Held-out samples before (SFT) and after (GRPO)", "", *_samples(report), "",
              "## Stage timings (seconds when the stage ran; * = reused from the cache)", ""]
    lines += [f"- {k}: {v:.1f}{' *' if k in report['stages']['skipped'] else ''}"
              for k, v in report["stage_seconds_when_run"].items()]
    return "\n".join(lines) + "\n"


def write_report(run, results: dict[str, Any], *, start_time: float) -> dict[str, Any]:
    """Builds the report, checks the targets, writes ``report.json``/``report.md`` and the
    accuracy curve; returns the report."""
    cfg = run.config
    evaluation = results["eval"]
    heldout = {name: {k: v for k, v in evaluation[name].items() if k != "correct"}
               for name in ("sft", *cfg.estimators)}
    heldout["prompts"], heldout["answers"] = evaluation["prompts"], evaluation["answers"]
    report = {"config": cfg.to_dict(), "quick": cfg.quick, "data": results["data"],
              "tokenizer": results["tokenizer"], "pretrain": results["pretrain"],
              "sft": results["sft"], "rl": results["rl"],
              "heldout": heldout, "stages": {"ran": run.cache.ran,
                                             "skipped": run.cache.skipped},
              "stage_seconds_when_run": dict(run.cache.recorded),
              "load_average": {"start": results.get("load_start", os.getloadavg()[0]),
                               "end": os.getloadavg()[0]}}
    report["total_wall_s"] = time.perf_counter() - start_time
    report["targets"] = _targets(report)
    report["passed"] = all(t["passed"] for t in report["targets"])
    report["enforced"] = not cfg.quick
    _plot(report, str(run.out / "accuracy_curve.png"))
    (run.out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (run.out / "report.md").write_text(_markdown(report))
    return report


def summary(report: dict[str, Any]) -> list[str]:
    """The console lines: the comparison table, then the targets."""
    return comparison_lines(report) + [""] + target_lines(report)
