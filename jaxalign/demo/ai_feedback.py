"""The demo's AI-feedback evaluation hooks: best-of-N reference points and an RLAIF variant.

* ``best_of_n``: for every evaluation prompt, ``n`` completions from the SFT model, the one the
  demo's learned reward model scores highest kept (:func:`jaxalign.train.best_of_n.best_of_n` with
  :func:`~jaxalign.train.scorers.reward_model_scorer`: best-of-N alignment picks by the learned
  reward; the gold reward only evaluates). Its gold reward and win rate vs SFT come from
  :func:`jaxalign.evaluate.summarize_rewards` against the same SFT baseline as every method.
  Its KL to SFT is not estimated: it is the analytic ``log n − (n − 1)/n``
  (:func:`~jaxalign.train.best_of_n.best_of_n_kl`; Stiennon et al. 2020, arXiv:2009.01325, and
  Beirami et al. 2024, arXiv:2401.01879, who show it is an upper bound on the true KL). One
  sampling pass at the largest ``n`` serves every ``n``: best-of-``n`` is the best of the first
  ``n`` of those i.i.d. samples, so it has exactly the best-of-``n`` distribution.
* ``rlaif_labels``: the same sampled pairs as ``preferences``, relabelled by an AI judge instead
  of the gold annotator — the reward model trained on the gold labels (no instruction-following
  judge is available offline) — through :func:`jaxalign.feedback.label_pairs`:
  ``P(a ≻ b) = σ(r_a − r_b)``, written with the soft ``p_chosen`` by
  :func:`jaxalign.feedback.preference_records`. Agreement with the gold ordering is reported on
  the held-out pairs (never seen by the judge) and, separately, on the train pairs (which it
  was trained on).
* ``rlaif_dpo``: DPO at the main β on the AI-labelled train pairs; the soft labels make it
  conservative DPO (per-pair label smoothing ``ε = 1 − p_chosen``, see
  :func:`jaxalign.train.preference.preference_loss`); ``eval/rlaif_dpo`` evaluates it like
  every other policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign.batching import map_batches
from jaxalign import feedback
from jaxalign.train.best_of_n import best_of_n, best_of_n_kl
from jaxalign.train.scorers import reward_model_scorer
from jaxalign.demo import task
from jaxalign.demo.align import run_evaluation, run_preference
from jaxalign.demo.context import Context, progress, read_jsonl
from jaxalign.evaluate import summarize_rewards
from jaxalign.models import RewardModel

__all__ = ["run_ai_feedback", "stage_best_of_n", "stage_rlaif_labels"]

RLAIF_RUN = "rlaif_dpo"


def _judge(ctx: Context) -> tuple[RewardModel, Any]:
    """The demo's reward model (trained on the gold-labelled train pairs) and its parameters."""
    return RewardModel(ctx.model.config), ctx.reward_params()


def stage_best_of_n(ctx: Context, out: Path, *, baseline: list[float]) -> dict[str, Any]:
    """Best-of-n of the SFT model under the reward model, for every ``n`` in ``config.bon_n``.

    ``gen_batch`` prompts per call (``gen_batch · max(n)`` samples, one compilation; a last
    partial batch repeats rows).
    """
    cfg = ctx.config
    n_max = max(cfg.bon_n)
    scorer = reward_model_scorer(*_judge(ctx))
    params, prompts = ctx.sft_params(), ctx.prompts("eval_prompts")
    count = len(prompts["prompt_ids"])
    key = jax.random.key(cfg.seed + 60)

    def sample(index, ids, mask):
        picked = best_of_n(ctx.model, params, scorer, {"prompt_ids": ids, "prompt_mask": mask},
                           n_max, jax.random.fold_in(key, index),
                           max_new_tokens=cfg.max_new_tokens, eos_id=ctx.tokenizer.eos_id,
                           pad_id=ctx.tokenizer.padding_id)
        return picked.scores, picked.all_tokens, picked.all_masks

    scores, tokens, masks = map_batches(
        sample, (prompts["prompt_ids"], prompts["prompt_mask"]), cfg.gen_batch,
        wrap=lambda starts: progress(starts, desc=f"best-of-{n_max} (reward model)", unit="batch"))
    rows = np.arange(count)
    points = []
    for n in cfg.bon_n:
        best = np.argmax(scores[:, :n], axis=1)  # best of the first n samples
        texts = ctx.decode(tokens[rows, best], masks[rows, best])
        finished = ctx.finished(tokens[rows, best], masks[rows, best])
        summary = summarize_rewards(task.gold_rewards(texts), baseline, seed=cfg.seed)
        summary["prompts"] = summary.pop("n")  # "n" is the number of samples here
        points.append({"n": n, **summary, "kl_closed_form": best_of_n_kl(n),
                       "reward_model_score": float(np.mean(scores[rows, best])),
                       "finished_share": float(np.mean(finished)),
                       "examples": texts[:3]})
    return {"samples_per_prompt": n_max, "prompts": count, "points": points}


def stage_rlaif_labels(ctx: Context, out: Path) -> dict[str, Any]:
    """Relabels the ``preferences`` pairs with the reward-model judge (soft labels).

    ``OUT/rlaif_labels/{train,heldout}.jsonl``: ``{"prompt", "chosen", "rejected",
    "p_chosen"}``, the judge's likelier-better response as ``chosen``.
    """
    cfg = ctx.config
    judge, judge_params = _judge(ctx)
    result: dict[str, Any] = {"judge": "reward model trained on the gold-labelled train pairs, "
                                       "P(a ≻ b) = σ(r_a − r_b)"}
    for split in progress(("train", "heldout"), desc="rlaif: labelling", unit="split"):
        records = read_jsonl(ctx.out / "preferences" / f"{split}.jsonl")
        prompts = [r["prompt"] for r in records]
        first = [r["chosen"] for r in records]  # the annotator's choice, judged as response a
        second = [r["rejected"] for r in records]
        p_first = feedback.label_pairs(judge, judge_params, ctx.tokenizer, prompts, first, second,
                                       max_length=cfg.max_len, batch_size=cfg.gen_batch)
        labelled = feedback.preference_records(prompts, first, second, p_first)
        feedback.write_jsonl(out / f"{split}.jsonl", labelled)
        judge_prefers_first = p_first >= 0.5  # as preference_records orders them
        gold_prefers_first = np.asarray([r["gold_chosen"] > r["gold_rejected"] for r in records])
        result[split] = {
            "pairs": len(labelled),
            "agreement_with_gold": float(np.mean(judge_prefers_first == gold_prefers_first)),
            "agreement_with_annotator": float(np.mean(judge_prefers_first)),
            "annotator_agreement_with_gold": float(np.mean(gold_prefers_first)),
            "mean_p_chosen": float(np.mean([r["p_chosen"] for r in labelled]))}
    return result


def run_ai_feedback(ctx: Context, baseline: dict[str, Any]) -> dict[str, Any]:
    """Runs (or reuses) the best-of-N and RLAIF stages; returns ``{"best_of_n", "rlaif"}``."""
    cfg, cache = ctx.config, ctx.cache
    bon = cache.run("best_of_n", {"seed": cfg.seed, "bon_n": list(cfg.bon_n),
                                  "gen_batch": cfg.gen_batch},
                    ("reward_model", "eval/baseline"),
                    lambda d: stage_best_of_n(ctx, d, baseline=baseline["rewards"]))
    labels = cache.run("rlaif_labels", {"max_len": cfg.max_len, "gen_batch": cfg.gen_batch},
                       ("reward_model",), lambda d: stage_rlaif_labels(ctx, d))
    run = run_preference(ctx, RLAIF_RUN, "dpo", cfg.dpo_beta, data="rlaif_labels")
    evaluation = run_evaluation(ctx, RLAIF_RUN, baseline)
    return {"best_of_n": bon, "rlaif": {"labels": labels, "run": run, "eval": evaluation}}
