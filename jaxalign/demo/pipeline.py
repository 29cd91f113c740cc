"""Stages 1–4 of the demo (corpus, tokenizer, SFT, preference data, reward model) and the
orchestration of the whole run. Stages 5–7 live in :mod:`jaxalign.demo.align`, best-of-N and
RLAIF in :mod:`jaxalign.demo.ai_feedback`, the report in :mod:`jaxalign.demo.report`; what the
stages share (:class:`~jaxalign.demo.context.Context`, the progress bar, the JSONL readers) in
:mod:`jaxalign.demo.context`.

Every stage is a function ``stage(ctx, stage_dir) -> result`` run through
:class:`~jaxalign.demo.cache.StageCache`, so a finished stage is skipped on the next run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign.data import DataLoader, load_jsonl
from jaxalign.demo import ai_feedback, align, report, task
from jaxalign.demo.cache import StageCache, save_params
from jaxalign.demo.config import DemoConfig
from jaxalign.demo.context import Context, preference_dataset, progress, read_jsonl
from jaxalign.feedback import write_jsonl
from jaxalign.models import (
    CausalLM, RewardModel, TransformerConfig, init_head_from_causal_lm, init_params,
)
from jaxalign.tokenizer import Tokenizer
from jaxalign.train import create_train_state, make_optimizer, make_reward_step, make_sft_step


# ----------------------------------------------------------------------------- stages
def stage_corpus(ctx: Context, out: Path) -> dict[str, Any]:
    """The generated reviews, as SFT records ``{"prompt", "completion"}``."""
    cfg = ctx.config
    rng = np.random.default_rng(cfg.seed)
    records = []
    for index in progress(range(cfg.num_reviews), desc="corpus", unit="review"):
        prompt, completion = task.sample_review(rng, positive=index % 2 == 0)
        records.append({"prompt": prompt, "completion": completion})
    write_jsonl(out / "reviews.jsonl", records)
    gold = task.gold_rewards(r["completion"] for r in records)
    return {"reviews": len(records), "positive_share": float(np.mean(gold > 0)),
            "negative_share": float(np.mean(gold < 0)), "gold_mean": float(np.mean(gold))}


def stage_prompts(ctx: Context, out: Path) -> dict[str, Any]:
    """The prompt sets (review openings) for preference pairs, PPO and evaluation."""
    cfg = ctx.config
    sizes = {"preference_prompts": cfg.pref_prompts,
             "ppo_prompts": cfg.ppo_iterations * cfg.ppo_batch,
             "eval_prompts": cfg.eval_prompts}
    for offset, (name, count) in enumerate(progress(sizes.items(), desc="prompts", unit="set"),
                                           start=1):
        prompts = task.make_prompts(count, seed=cfg.seed * 1000 + offset)
        write_jsonl(out / f"{name}.jsonl", [{"prompt": p} for p in prompts])
    return sizes


def stage_tokenizer(ctx: Context, out: Path) -> dict[str, Any]:
    """Byte-level BPE trained on the reviews."""
    records = read_jsonl(ctx.out / "corpus" / "reviews.jsonl")
    texts = (r["prompt"] + r["completion"]
             for r in progress(records, desc="tokenizer", unit="review"))
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=ctx.config.vocab_size)
    tokenizer.save(out / "tokenizer")
    lengths = [len(tokenizer.encode(r["completion"])) for r in records[:2000]]
    return {"vocab_size": tokenizer.vocab_size,
            "completion_tokens_p50": float(np.median(lengths)),
            "completion_tokens_max": int(max(lengths))}


def make_model(ctx: Context) -> None:
    cfg = ctx.config
    ctx.tokenizer = Tokenizer.from_file(ctx.out / "tokenizer" / "tokenizer")
    ctx.model = CausalLM(TransformerConfig(
        vocab_size=ctx.tokenizer.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, max_len=cfg.max_len))


def stage_sft(ctx: Context, out: Path) -> dict[str, Any]:
    """Pretrain/SFT the policy on whole reviews (opening included) with ``make_sft_step``."""
    cfg = ctx.config
    dataset = load_jsonl(ctx.out / "corpus" / "reviews.jsonl", ctx.tokenizer, kind="sft",
                         config=ctx.data_config())
    loader = DataLoader(dataset, cfg.sft_batch, seed=cfg.seed)
    optimizer = make_optimizer(cfg.sft_lr, total_steps=cfg.sft_steps,
                               warmup_steps=cfg.sft_steps // 10, end_lr_ratio=0.1)
    params = init_params(ctx.model, jax.random.key(cfg.seed))
    state = create_train_state(params, optimizer, jax.random.key(cfg.seed + 1))
    step = make_sft_step(ctx.model, optimizer, include_prompt=True)
    losses = []
    bar = progress(range(cfg.sft_steps), desc="sft", unit="step")
    for index in bar:
        state, metrics = step(state, loader.batch_at(index))
        if index % 20 == 0 or index == cfg.sft_steps - 1:
            losses.append(float(metrics["nll"]))
            bar.set_postfix(nll=f"{losses[-1]:.3f}")
    save_params(state.params, out / "params.msgpack")
    return {"steps": cfg.sft_steps, "first_nll": losses[0], "final_nll": losses[-1],
            "truncated_reviews": dataset.report.num_truncated}


def stage_preferences(ctx: Context, out: Path) -> dict[str, Any]:
    """Two SFT samples per prompt, labelled by a Bradley–Terry annotator on the gold reward.

    Pairs with equal gold reward (the annotator is indifferent), identical texts, an empty
    completion, or one that ran out of tokens before EOS are dropped. A random
    ``heldout_fraction`` of the pairs goes to ``heldout.jsonl``, the rest to ``train.jsonl``;
    both carry ``gold_chosen``/``gold_rejected`` (extra fields the data loader ignores).
    """
    cfg = ctx.config
    params = ctx.sft_params()
    prompts = ctx.prompts("preference_prompts")
    texts_prompt = ctx.decode(prompts["prompt_ids"], prompts["prompt_mask"])
    key = jax.random.key(cfg.seed + 10)
    samples = []
    for index in progress(range(2), desc="preferences: sampling", unit="set"):
        sample = ctx.sample(params, prompts, jax.random.fold_in(key, index))
        finished = ctx.finished(sample.tokens, sample.completion_mask)
        samples.append((ctx.decode(sample.tokens, sample.completion_mask), finished))
    (texts_a, done_a), (texts_b, done_b) = samples
    gold_a, gold_b = task.gold_rewards(texts_a), task.gold_rewards(texts_b)
    rng = np.random.default_rng(cfg.seed + 11)
    records, ties, unfinished, agree = [], 0, 0, 0
    for i in range(len(texts_a)):
        if (not (done_a[i] and done_b[i]) or texts_a[i] == texts_b[i]
                or not texts_a[i].strip() or not texts_b[i].strip()):
            unfinished += 1
            continue
        if gold_a[i] == gold_b[i]:
            ties += 1
            continue
        a_wins = task.bradley_terry_label(gold_a[i], gold_b[i], rng, temperature=cfg.bt_temperature)
        pair = [(texts_a[i], float(gold_a[i])), (texts_b[i], float(gold_b[i]))]
        (chosen, g_c), (rejected, g_r) = pair if a_wins else pair[::-1]
        agree += int(g_c > g_r)
        records.append({"prompt": texts_prompt[i], "chosen": chosen, "rejected": rejected,
                        "gold_chosen": g_c, "gold_rejected": g_r})
    order = rng.permutation(len(records))
    n_heldout = max(1, int(round(cfg.heldout_fraction * len(records))))
    write_jsonl(out / "heldout.jsonl", [records[i] for i in order[:n_heldout]])
    write_jsonl(out / "train.jsonl", [records[i] for i in order[n_heldout:]])
    return {"pairs_train": len(records) - n_heldout, "pairs_heldout": n_heldout,
            "ties_dropped": ties, "unfinished_empty_or_identical_dropped": unfinished,
            "label_agreement_with_gold": agree / max(len(records), 1),
            "bt_temperature": cfg.bt_temperature,
            "sft_sample_gold_mean": float(np.mean(np.concatenate([gold_a, gold_b])))}


def stage_reward_model(ctx: Context, out: Path) -> dict[str, Any]:
    """Bradley–Terry reward model, trunk initialised from the SFT model."""
    cfg = ctx.config
    train, heldout = preference_dataset(ctx, "train"), preference_dataset(ctx, "heldout")
    loader = DataLoader(train, cfg.rm_batch, seed=cfg.seed + 20)
    steps = max(1, cfg.rm_epochs * loader.steps_per_epoch)
    reward_model = RewardModel(ctx.model.config)
    params = init_head_from_causal_lm(reward_model, ctx.sft_params(), jax.random.key(cfg.seed + 21))
    optimizer = make_optimizer(cfg.rm_lr, total_steps=steps, warmup_steps=steps // 10)
    state = create_train_state(params, optimizer, jax.random.key(cfg.seed + 22))
    step = make_reward_step(reward_model, optimizer)
    accuracies = []
    bar = progress(range(steps), desc="reward model", unit="step")
    for index in bar:
        state, metrics = step(state, loader.batch_at(index))
        accuracies.append(metrics["accuracy"])
        if index % 20 == 0:
            bar.set_postfix(loss=f"{float(metrics['bt_loss']):.3f}")
    save_params(state.params, out / "params.msgpack")

    score = jax.jit(lambda p, ids, mask: reward_model.apply({"params": p}, ids, mask))
    batch = heldout.collate(np.arange(len(heldout)))
    chosen = np.asarray(score(state.params, batch["chosen_ids"], batch["chosen_attention_mask"]))
    rejected = np.asarray(score(state.params, batch["rejected_ids"],
                                batch["rejected_attention_mask"]))
    records = read_jsonl(ctx.out / "preferences" / "heldout.jsonl")
    gold_says_chosen = np.asarray([r["gold_chosen"] > r["gold_rejected"] for r in records])
    rm_says_chosen = chosen > rejected
    tail = max(1, len(accuracies) // 5)
    return {"steps": steps,
            "heldout_accuracy": float(np.mean(rm_says_chosen == gold_says_chosen)),
            "heldout_label_accuracy": float(np.mean(rm_says_chosen)),
            "train_accuracy": float(np.mean([float(a) for a in accuracies[-tail:]])),
            "heldout_pairs": int(len(records))}


# ----------------------------------------------------------------------------- the run
def run_demo(config: DemoConfig, out: str | Path, *, log: Callable[[str], None] = print,
             start_time: float | None = None) -> dict[str, Any]:
    """Runs (or resumes) every stage under ``out`` and writes the report; returns it."""
    start_time = time.perf_counter() if start_time is None else start_time
    cache = StageCache(out, log=log)
    ctx = Context(config=config, cache=cache)
    cfg = config
    results: dict[str, Any] = {}
    results["corpus"] = cache.run("corpus", {"seed": cfg.seed, "num_reviews": cfg.num_reviews},
                                  (), lambda d: stage_corpus(ctx, d))
    results["prompts"] = cache.run("prompts", {k: getattr(cfg, k) for k in (
        "seed", "pref_prompts", "ppo_iterations", "ppo_batch", "eval_prompts")}, (),
        lambda d: stage_prompts(ctx, d))
    results["tokenizer"] = cache.run("tokenizer", {"vocab_size": cfg.vocab_size}, ("corpus",),
                                     lambda d: stage_tokenizer(ctx, d))
    make_model(ctx)
    model_settings = {k: getattr(cfg, k) for k in (
        "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "prompt_len", "max_new_tokens")}
    results["sft"] = cache.run("sft", {**model_settings, **{k: getattr(cfg, k) for k in (
        "seed", "sft_steps", "sft_batch", "sft_lr")}}, ("tokenizer",), lambda d: stage_sft(ctx, d))
    results["preferences"] = cache.run("preferences", {k: getattr(cfg, k) for k in (
        "seed", "bt_temperature", "heldout_fraction", "gen_batch")}, ("sft", "prompts"),
        lambda d: stage_preferences(ctx, d))
    results["reward_model"] = cache.run("reward_model", {k: getattr(cfg, k) for k in (
        "seed", "rm_epochs", "rm_batch", "rm_lr")}, ("preferences",),
        lambda d: stage_reward_model(ctx, d))
    results.update(align.run_alignment(ctx))
    results.update(ai_feedback.run_ai_feedback(ctx, results["baseline"]))
    return report.write_report(ctx, results, start_time=start_time)
