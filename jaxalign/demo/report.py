"""The demo's targets, ``report.json``, ``report.md``, plots and console table.

Targets (checked by every run, enforced — exit status 1 — without ``--quick``):

* reward model: held-out accuracy against the gold ordering ≥ 0.75;
* PPO, DPO, IPO, ORPO, and DPO on the AI-judge labels (``rlaif_dpo``, see
  :mod:`jaxalign.demo.ai_feedback`): win rate vs SFT ≥ 0.65, lower end of its bootstrap 95% CI
  > 0.5, and a finite KL to SFT;
* PPO's curve: the mean gold reward of the samples of the last 10% of iterations minus that of
  the first 10% (samples pooled, see :func:`jaxalign.evaluate.curve_improvement`) must exceed
  both 0.5 gold-reward units and 2 standard errors of the difference.

Best-of-N points and the AI judge's label agreement are reported, not targets.

The schema of ``report.json`` is documented in :mod:`jaxalign.evaluate`.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from jaxalign.demo.align import planned_runs
from jaxalign.evaluate import curve_improvement
from jaxalign.plots import plot_frontier, plot_reward_curve

METHODS = ("ppo", "dpo", "ipo", "orpo")
FRONTIER_METHODS = ("simpo", "kto")  # reported with win rate and CI, no targets
BON_LABEL = "best-of-n (KL: log n − (n−1)/n)"
RM_ACCURACY_TARGET = 0.75
WIN_RATE_TARGET = 0.65
PPO_MARGIN_UNITS = 0.5  # gold-reward units
PPO_MARGIN_SES = 2.0  # standard errors


def _method_entry(evaluation: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    entry = {k: v for k, v in evaluation.items() if k != "rewards"}
    entry["hyperparameters"] = {} if run is None else run["hyperparameters"]
    return entry


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []

    def add(name, value, threshold, passed):
        targets.append({"name": name, "value": value, "threshold": threshold,
                        "passed": bool(passed)})

    accuracy = report["reward_model"]["heldout_accuracy"]
    add("reward_model.heldout_accuracy", accuracy, f">= {RM_ACCURACY_TARGET}",
        accuracy >= RM_ACCURACY_TARGET)
    judged = [(method, report["methods"][method]) for method in METHODS]
    for method, entry in judged + [("rlaif_dpo", report["rlaif"]["dpo"])]:
        add(f"{method}.win_rate_vs_sft", entry["win_rate_vs_sft"], f">= {WIN_RATE_TARGET}",
            entry["win_rate_vs_sft"] >= WIN_RATE_TARGET)
        low = entry["win_rate_ci"][0]
        add(f"{method}.win_rate_ci_low", low, "> 0.5", low > 0.5)
        add(f"{method}.kl_to_sft", entry["kl_to_sft"], "reported (finite)",
            math.isfinite(entry["kl_to_sft"]))
    gain = report["ppo_curve"]["improvement"]
    needed = max(PPO_MARGIN_UNITS, PPO_MARGIN_SES * gain["se"])
    add("ppo.curve_last10%_minus_first10%", gain["improvement"],
        f"> max({PPO_MARGIN_UNITS}, {PPO_MARGIN_SES:g}·SE) = {needed:.3f}",
        gain["improvement"] > needed)
    return targets


def build_report(ctx, results: dict[str, Any]) -> dict[str, Any]:
    """Assembles the report dictionary (schema in :mod:`jaxalign.evaluate`) from stage results."""
    cfg = ctx.config
    runs, evals = results["runs"], results["evals"]
    main = {method: run for run, method, _, is_main in planned_runs(ctx)
            if is_main or method in FRONTIER_METHODS}
    methods = {"sft": _method_entry(evals["sft"], None)}
    for method in METHODS + FRONTIER_METHODS:
        methods[method] = _method_entry(evals[main[method]], runs[main[method]])
    ppo = runs["ppo"]
    curve = dict(ppo["curve"])
    curve["improvement"] = curve_improvement(ppo["per_iteration_gold"], fraction=0.1)
    frontier = [{"method": "sft", "param": "", "value": 0.0, "run": "sft",
                 "gold_reward": evals["sft"]["gold_reward"], "kl_to_sft": 0.0,
                 "win_rate_vs_sft": evals["sft"]["win_rate_vs_sft"]}]
    for run, method, coef, _ in planned_runs(ctx):
        label = {"ppo": "ppo (adaptive KL)", "ppo_fixed": "ppo (fixed β)"}.get(method, method)
        param = {"orpo": "λ", "ppo": "β0"}.get(method, "β")
        frontier.append({"method": label, "param": param, "value": coef, "run": run,
                         "gold_reward": evals[run]["gold_reward"],
                         "kl_to_sft": evals[run]["kl_to_sft"],
                         "win_rate_vs_sft": evals[run]["win_rate_vs_sft"]})
    labels = results["rlaif"]["labels"]
    rlaif = {"judge": labels["judge"],
             "label_agreement": labels["heldout"]["agreement_with_gold"],
             "label_agreement_pairs": "heldout (not used to train the judge)",
             "label_agreement_train": labels["train"]["agreement_with_gold"],
             "n_pairs": labels["train"]["pairs"], "n_pairs_heldout": labels["heldout"]["pairs"],
             "labels": labels,
             "dpo": _method_entry(results["rlaif"]["eval"], results["rlaif"]["run"])}
    frontier.append({"method": "dpo (RLAIF labels)", "param": "β", "value": cfg.dpo_beta,
                     "run": "rlaif_dpo", "gold_reward": rlaif["dpo"]["gold_reward"],
                     "kl_to_sft": rlaif["dpo"]["kl_to_sft"],
                     "win_rate_vs_sft": rlaif["dpo"]["win_rate_vs_sft"]})
    best_of_n = results["best_of_n"]["points"]
    frontier += [{"method": BON_LABEL, "param": "n", "value": p["n"], "run": "best_of_n",
                  "label": f"BoN n={p['n']}", "kl_closed_form": True,
                  "gold_reward": p["gold_reward"], "kl_to_sft": p["kl_closed_form"],
                  "win_rate_vs_sft": p["win_rate_vs_sft"]} for p in best_of_n]
    report = {
        "config": cfg.to_dict(), "quick": cfg.quick,
        "corpus": results["corpus"], "prompts": results["prompts"],
        "tokenizer": results["tokenizer"], "sft": results["sft"],
        "preferences": results["preferences"], "reward_model": results["reward_model"],
        "methods": methods, "ppo_curve": curve, "frontier": frontier,
        "best_of_n": best_of_n, "rlaif": rlaif,
        "stages": {"ran": ctx.cache.ran, "skipped": ctx.cache.skipped},
    }
    report["targets"] = _targets(report)
    report["passed"] = all(t["passed"] for t in report["targets"])
    report["enforced"] = not cfg.quick
    return report


def _result_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, entry)`` of every evaluated policy: the methods, then DPO on the AI labels."""
    return [*report["methods"].items(), ("rlaif_dpo", report["rlaif"]["dpo"])]


def results_table(report: dict[str, Any]) -> list[str]:
    """The results as aligned text rows (method, gold reward, KL, win rate, CI), then the
    best-of-N reference points (KL from the closed form)."""
    rows = [f"{'method':<9} {'gold reward':>16} {'KL to SFT':>16} {'win vs SFT':>10} "
            f"{'95% CI':>15}  hyperparameters"]
    for name, entry in _result_rows(report):
        low, high = entry["win_rate_ci"]
        hyper = ", ".join(f"{k}={v}" for k, v in entry["hyperparameters"].items()
                          if k in ("beta", "orpo_lambda", "simpo_gamma", "kl_coef_init",
                                   "kl_target"))
        rows.append(f"{name:<9} {entry['gold_reward']:+8.3f} ± {entry['gold_reward_se']:5.3f} "
                    f"{entry['kl_to_sft']:8.3f} ± {entry['kl_to_sft_se']:5.3f} "
                    f"{entry['win_rate_vs_sft']:10.3f} [{low:.3f}, {high:.3f}]  {hyper}")
    for point in report["best_of_n"]:
        low, high = point["win_rate_ci"]
        name = f"BoN n={point['n']}"
        rows.append(f"{name:<9} {point['gold_reward']:+8.3f} ± {point['gold_reward_se']:5.3f} "
                    f"{point['kl_closed_form']:8.3f} (bound) {point['win_rate_vs_sft']:10.3f} "
                    f"[{low:.3f}, {high:.3f}]  reward-model pick of n SFT samples")
    return rows


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Data, reward-model and PPO-curve figures the targets refer to."""
    prefs, rm, rlaif = report["preferences"], report["reward_model"], report["rlaif"]
    gain = report["ppo_curve"]["improvement"]
    return [
        f"preference pairs: {prefs['pairs_train']} train / {prefs['pairs_heldout']} held out, "
        f"labels agree with gold on {prefs['label_agreement_with_gold']:.3f} "
        f"(Bradley–Terry τ={prefs['bt_temperature']:g})",
        f"reward model: held-out accuracy vs gold {rm['heldout_accuracy']:.3f} "
        f"({rm['heldout_pairs']} pairs)",
        f"PPO gold reward: first {gain['iterations_pooled']} iterations {gain['first_mean']:+.3f}"
        f" -> last {gain['iterations_pooled']} {gain['last_mean']:+.3f}; margin "
        f"{gain['improvement']:+.3f} ± {gain['se']:.3f} (SE); required > max({PPO_MARGIN_UNITS}, "
        f"{PPO_MARGIN_SES:g}·SE)",
        f"RLAIF: reward-model judge agrees with gold on {rlaif['label_agreement']:.3f} of "
        f"{rlaif['n_pairs_heldout']} held-out pairs ({rlaif['label_agreement_train']:.3f} of the "
        f"{rlaif['n_pairs']} train pairs it was trained on); DPO on its labels: win rate "
        f"{rlaif['dpo']['win_rate_vs_sft']:.3f}",
    ]


def target_lines(report: dict[str, Any]) -> list[str]:
    return [f"{'PASS' if t['passed'] else 'FAIL'}  {t['name']:<34} {t['value']:8.3f}  "
            f"(target {t['threshold']})" for t in report["targets"]]


def _rlaif_markdown(report: dict[str, Any]) -> list[str]:
    rlaif = report["rlaif"]
    labels, dpo = rlaif["labels"], rlaif["dpo"]
    low, high = dpo["win_rate_ci"]
    return [
        "## RLAIF: the same pairs labelled by an AI judge", "",
        f"Judge: the {labels['judge']} (no instruction-following judge offline), via "
        "`jaxalign.feedback.label_pairs`; soft labels `p_chosen` train DPO as conservative DPO "
        "(per-pair label smoothing 1 − p_chosen). Agreement = share of pairs where the judge "
        "prefers the response with the higher gold reward.", "",
        "| pairs | n | AI labels agree with gold | annotator (BT) labels agree with gold | "
        "AI agrees with annotator | mean p_chosen |", "|---|---|---|---|---|---|",
        *[f"| {split}{' (judge trained on them)' if split == 'train' else ' (unseen by judge)'} | "
          f"{labels[split]['pairs']} | {labels[split]['agreement_with_gold']:.3f} | "
          f"{labels[split]['annotator_agreement_with_gold']:.3f} | "
          f"{labels[split]['agreement_with_annotator']:.3f} | "
          f"{labels[split]['mean_p_chosen']:.3f} |" for split in ("heldout", "train")], "",
        f"DPO (β = {dpo['hyperparameters']['beta']}) on the {rlaif['n_pairs']} AI-labelled train "
        f"pairs: gold reward {dpo['gold_reward']:+.3f} ± {dpo['gold_reward_se']:.3f}, KL to SFT "
        f"{dpo['kl_to_sft']:.3f}, win rate vs SFT {dpo['win_rate_vs_sft']:.3f} "
        f"[{low:.3f}, {high:.3f}] (the `rlaif_dpo` row above; gold-label DPO: "
        f"{report['methods']['dpo']['win_rate_vs_sft']:.3f}).", ""]


def _best_of_n_markdown(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Best-of-N reference points", "",
        "n completions per evaluation prompt from the SFT model; the learned reward model picks "
        "one; gold reward and win rate vs SFT as for every method. KL(π_BoN‖π_SFT) is the "
        "analytic log n − (n−1)/n (Stiennon et al. 2020; Beirami et al. 2024 show it is an "
        "upper bound), not an estimate.", "",
        "| n | gold reward | KL (closed form) | win rate vs SFT | 95% CI | reward-model score "
        "of pick | pick finished (EOS) |", "|---|---|---|---|---|---|---|"]
    for p in report["best_of_n"]:
        lines.append(f"| {p['n']} | {p['gold_reward']:+.3f} ± {p['gold_reward_se']:.3f} | "
                     f"{p['kl_closed_form']:.3f} | {p['win_rate_vs_sft']:.3f} | "
                     f"[{p['win_rate_ci'][0]:.3f}, {p['win_rate_ci'][1]:.3f}] | "
                     f"{p['reward_model_score']:+.3f} | {p['finished_share']:.3f} |")
    return lines + [""]


def _markdown(report: dict[str, Any]) -> str:
    rm, prefs = report["reward_model"], report["preferences"]
    gain = report["ppo_curve"]["improvement"]
    lines = ["# jaxalign demo: controlled sentiment", "",
             f"Quick mode: {report['quick']}. Wall time of the run that wrote this report: "
             f"{report['total_wall_s']:.1f} s ({len(report['stages']['skipped'])} of "
             f"{len(report['stage_seconds_when_run'])} stages reused from the cache; the stages "
             f"took {sum(report['stage_seconds_when_run'].values()):.1f} s when they ran).", "",
             "## Results (gold reward of samples, KL(π‖π_SFT) in nats per completion, "
             "win rate vs SFT with bootstrap 95% CI)", "",
             "| method | gold reward | KL to SFT | win rate vs SFT | 95% CI | hyperparameters |",
             "|---|---|---|---|---|---|"]
    for name, e in _result_rows(report):
        hyper = ", ".join(f"{k}={v}" for k, v in e["hyperparameters"].items())
        lines.append(f"| {name} | {e['gold_reward']:+.3f} ± {e['gold_reward_se']:.3f} | "
                     f"{e['kl_to_sft']:.3f} ± {e['kl_to_sft_se']:.3f} | "
                     f"{e['win_rate_vs_sft']:.3f} | [{e['win_rate_ci'][0]:.3f}, "
                     f"{e['win_rate_ci'][1]:.3f}] | {hyper} |")
    lines += ["", "## Targets", "", "| target | value | threshold | result |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']:.3f} | {t['threshold']} | "
              f"{'pass' if t['passed'] else 'FAIL'} |" for t in report["targets"]]
    lines += ["", "## Data and reward model", "",
              f"- preference pairs: {prefs['pairs_train']} train, {prefs['pairs_heldout']} "
              f"held out; {prefs['ties_dropped']} gold ties dropped; labels agree with gold on "
              f"{prefs['label_agreement_with_gold']:.3f} (Bradley–Terry τ = "
              f"{prefs['bt_temperature']})",
              f"- reward model held-out accuracy vs gold: {rm['heldout_accuracy']:.3f} "
              f"(vs noisy labels {rm['heldout_label_accuracy']:.3f})",
              f"- PPO gold reward, first 10% of iterations {gain['first_mean']:+.3f} → last 10% "
              f"{gain['last_mean']:+.3f} (improvement {gain['improvement']:+.3f} ± "
              f"{gain['se']:.3f} SE)", ""]
    lines += _rlaif_markdown(report) + _best_of_n_markdown(report)
    lines += ["## Reward–KL frontier", "",
              "| method | swept | gold reward | KL to SFT | win rate |", "|---|---|---|---|---|"]
    for p in report["frontier"]:
        swept = f"{p['param']}={p['value']:g}" if p["param"] else "-"
        bound = " †" if p.get("kl_closed_form") else ""
        lines.append(f"| {p['method']} | {swept} | {p['gold_reward']:+.3f} | "
                     f"{p['kl_to_sft']:.3f}{bound} | {p['win_rate_vs_sft']:.3f} |")
    lines += ["", "† analytic KL of best-of-n, log n − (n−1)/n (an upper bound), not "
              "estimated.", "", "![reward curve](reward_curve.png)", "",
              "![frontier](frontier.png)", "", "## Samples", ""]
    for name, e in _result_rows(report):
        lines += [f"- **{name}**: " + " / ".join(f"“{t.strip()}”" for t in e["examples"][:3])]
    lines += ["", "## Stage timings (seconds when the stage ran; * = reused from the cache)", ""]
    lines += [f"- {k}: {v:.1f}{' *' if k in report['stages']['skipped'] else ''}"
              for k, v in report["stage_seconds_when_run"].items()]
    return "\n".join(lines) + "\n"


def write_report(ctx, results: dict[str, Any], *, start_time: float) -> dict[str, Any]:
    """Builds the report, draws the plots, writes ``report.json`` and ``report.md``."""
    out = ctx.out
    report = build_report(ctx, results)
    curves = {"adaptive KL (main)": results["runs"]["ppo"]["curve"]}
    for run, method, coef, _ in planned_runs(ctx):
        if method == "ppo_fixed":
            curves[f"fixed β={coef:g}"] = results["runs"][run]["curve"]
    plot_reward_curve(curves, str(out / "reward_curve.png"))
    plot_frontier(report["frontier"], str(out / "frontier.png"))
    report["timings_s"] = dict(ctx.cache.timings)
    report["stage_seconds_when_run"] = dict(ctx.cache.recorded)
    report["total_wall_s"] = time.perf_counter() - start_time
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report
