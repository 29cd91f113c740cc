"""The math demo: a task GRPO measurably learns from a verifiable reward alone.

``python -m jaxalign.demo --task math [--quick] [--out runs/demo_math]`` (``make demo-math``)
runs, each stage cached under ``OUT/<stage>/`` (:class:`~jaxalign.demo.cache.StageCache`):

1. ``data``: the pair splits and problems of :mod:`jaxalign.demo.math_task`, written as
   ``rl_prompts.jsonl`` / ``heldout.jsonl`` (``{"prompt", "answer"}``, what ``jaxalign grpo``
   reads) and ``sft.jsonl`` (``{"prompt", "completion"}``);
2. ``tokenizer``: byte-level BPE with every digit its own token;
3. ``pretrain``: a small ``CausalLM`` trained on the pretraining documents of
   :mod:`jaxalign.demo.math_task` (equations of every pair, worked questions of the others);
   ``sft``: the warm-up on the few formatted examples, three in four of them terse
   (``make_sft_step`` both);
4. ``rl_<estimator>``: the one-jit RLHF step (:func:`jaxalign.train.rlhf.make_rlhf_step`) with
   ``reward_fns=[jaxalign.rewards.math_answer]`` through ``jax.pure_callback``, for ``grpo``,
   ``dr_grpo`` and ``rloo`` on the same budget (prompts, samples, iterations, learning rate);
   held-out greedy accuracy every ``eval_every`` iterations is the accuracy curve;
5. ``eval``: held-out exact-match accuracy of the SFT model and of every RL run, greedy (with a
   bootstrap 95% CI over prompts) and sampled at temperature 1, and samples before/after.

:mod:`jaxalign.demo.math_report` checks the targets and writes ``report.md``/``report.json`` and
``accuracy_curve.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import rewards
from jaxalign.demo import math_report, math_task
from jaxalign.demo.cache import StageCache, load_params, save_params
from jaxalign.demo.config import SequenceLengths
from jaxalign.demo.context import RunContext, progress, read_jsonl
from jaxalign.evaluate import bootstrap_ci, sample_completions
from jaxalign.feedback import write_jsonl
from jaxalign.models import CausalLM, TransformerConfig, init_params
from jaxalign.tokenizer import Tokenizer, pad_rows
from jaxalign.train import create_train_state, make_optimizer, make_sft_step, rlhf

__all__ = ["FULL", "QUICK", "MathConfig", "run_math_demo"]


@dataclasses.dataclass(frozen=True)
class MathConfig(SequenceLengths):
    """Every number the math demo uses."""

    seed: int = 0
    max_operand: int = 15  # a, b in 0..15: 256 pairs
    heldout_fraction: float = 0.3
    sft_pairs: int = 24  # pairs asked as formatted examples (2 wordings each)
    sft_examples_per_pair: int = 2
    vocab_size: int = 512
    prompt_len: int = 32
    max_new_tokens: int = 16
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 172
    pretrain_steps: int = 800
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_worked_share: float = 0.5  # worked questions among the pretraining documents
    sft_steps: int = 60
    sft_batch: int = 64
    sft_lr: float = 1e-3
    sft_worked_share: float = 0.25  # worked examples among the formatted ones; the rest terse
    rl_iterations: int = 60
    rl_prompts: int = 32  # prompts per iteration, each sampled `samples` times
    samples: int = 8
    rl_lr: float = 2e-4
    estimators: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")
    eval_prompts: int = 384
    eval_every: int = 10
    quick: bool = False


FULL = MathConfig()
QUICK = dataclasses.replace(FULL, pretrain_steps=40, sft_steps=10, rl_iterations=4,
                            rl_prompts=8, samples=4, eval_prompts=64, eval_every=2, quick=True)


@dataclasses.dataclass
class _Run(RunContext):
    config: MathConfig

    def prompts(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        ids = [[self.tokenizer.bos_id] + self.tokenizer.encode(r["prompt"]) for r in records]
        prompt_ids, prompt_mask = pad_rows(ids, self.config.prompt_len,
                                           pad_id=self.tokenizer.padding_id, side="left")
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}

    def complete(self, params: Any, batch: dict, key: jax.Array, temperature: float) -> list[str]:
        out = sample_completions(
            self.model, params, batch["prompt_ids"], batch["prompt_mask"], key,
            max_new_tokens=self.config.max_new_tokens, eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.padding_id, batch_size=len(batch["prompt_ids"]),
            temperature=temperature)
        return self.tokenizer.decode_batch(out.tokens, attention_mask=out.completion_mask)


# ----------------------------------------------------------------------------- stages
def stage_data(run: _Run, out: Path) -> dict[str, Any]:
    cfg = run.config
    splits = math_task.split_pairs(cfg.seed, max_operand=cfg.max_operand,
                                   sft_pairs=cfg.sft_pairs, heldout_fraction=cfg.heldout_fraction)
    sft = math_task.problems(splits["sft"], cfg.sft_pairs * cfg.sft_examples_per_pair,
                             cfg.seed + 1)
    rl = math_task.problems(splits["rl"], cfg.rl_iterations * cfg.rl_prompts, cfg.seed + 2)
    heldout = math_task.problems(splits["heldout"], cfg.eval_prompts, cfg.seed + 3)
    worked = np.random.default_rng(cfg.seed + 6).random(len(sft)) < cfg.sft_worked_share
    write_jsonl(out / "sft.jsonl", [{"prompt": math_task.prompt_text(p.question), "completion": (
        math_task.worked_text if w else math_task.terse_text)(p.a, p.b)}
        for p, w in zip(sft, worked)])
    write_jsonl(out / "pairs.jsonl", [{"split": name, "a": a, "b": b}
                                      for name, pairs in splits.items() for a, b in pairs])
    write_jsonl(out / "rl_prompts.jsonl", [p.record() for p in rl])
    write_jsonl(out / "heldout.jsonl", [p.record() | {"a": p.a, "b": p.b} for p in heldout])
    return {name: len(pairs) for name, pairs in splits.items()} | {
        "sft_examples": len(sft), "sft_worked_examples": int(worked.sum()),
        "rl_prompts": len(rl), "heldout_prompts": len(heldout)}


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE in which every digit is a token of its own (numbers stay spelt out)."""
    return Tokenizer.train_bpe(texts, vocab_size=vocab_size, split_digits=True)


def _worked_pairs(run: _Run) -> list[tuple[int, int]]:
    """Pairs of the worked pretraining questions: every pair but the held-out ones."""
    rows = read_jsonl(run.out / "data" / "pairs.jsonl")
    return [(r["a"], r["b"]) for r in rows if r["split"] != "heldout"]


def _documents(run: _Run, rng: np.random.Generator, count: int,
               pairs: list[tuple[int, int]]) -> list[str]:
    cfg = run.config
    return [math_task.pretraining_document(rng, pairs, max_operand=cfg.max_operand,
                                           worked_share=cfg.pretrain_worked_share)
            for _ in range(count)]


def stage_tokenizer(run: _Run, out: Path) -> dict[str, Any]:
    cfg = run.config
    data = run.out / "data"
    texts = _documents(run, np.random.default_rng(cfg.seed + 4), 2000, _worked_pairs(run))
    texts += [r["prompt"] + r["completion"] for r in read_jsonl(data / "sft.jsonl")]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    return {"vocab_size": tokenizer.vocab_size}


def make_model(run: _Run) -> None:
    cfg = run.config
    run.tokenizer = Tokenizer.from_file(run.out / "tokenizer" / "tokenizer")
    run.model = CausalLM(TransformerConfig(
        vocab_size=run.tokenizer.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, max_len=cfg.max_len))


def _batch(run: _Run, texts: list[str], prompt_lengths: list[int] | None = None
           ) -> dict[str, np.ndarray]:
    """``[B, max_len]`` SFT rows ``[BOS] text [EOS]``; the loss covers everything after BOS, or
    only what follows the first ``prompt_lengths[i]`` characters (the prompt)."""
    cfg, tok = run.config, run.tokenizer
    rows, starts = [], []
    for i, encoding in enumerate(tok.backend.encode_batch(texts)):
        rows.append(([tok.bos_id] + encoding.ids)[:cfg.max_len - 1] + [tok.eos_id])
        starts.append(1 if prompt_lengths is None else 1 + len(
            tok.encode(texts[i][:prompt_lengths[i]])))
    ids, attention = pad_rows(rows, cfg.max_len, pad_id=tok.padding_id, side="right")
    loss_mask = attention.copy()
    loss_mask[np.arange(cfg.max_len)[None, :] < np.asarray(starts)[:, None]] = 0
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": loss_mask}


def _train(run: _Run, params: Any, batches, *, steps: int, lr: float, desc: str
           ) -> tuple[Any, list[float]]:
    optimizer = make_optimizer(lr, total_steps=steps, warmup_steps=steps // 10,
                               end_lr_ratio=0.1)
    state = create_train_state(params, optimizer, jax.random.key(run.config.seed + 1))
    step = make_sft_step(run.model, optimizer, include_prompt=True)
    losses = []
    bar = progress(range(steps), desc=desc, unit="step")
    for index in bar:
        state, metrics = step(state, next(batches))
        if index % 50 == 0 or index == steps - 1:
            losses.append(float(metrics["nll"]))
            bar.set_postfix(nll=f"{losses[-1]:.3f}")
    return state.params, losses


def stage_pretrain(run: _Run, out: Path) -> dict[str, Any]:
    """Next-token prediction on fresh pretraining documents every step."""
    cfg = run.config
    rng = np.random.default_rng(cfg.seed + 5)
    pairs = _worked_pairs(run)  # read once, not once per step
    batches = (_batch(run, _documents(run, rng, cfg.pretrain_batch, pairs))
               for _ in itertools.repeat(None))
    params, losses = _train(run, init_params(run.model, jax.random.key(cfg.seed)), batches,
                            steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, desc="math: pretrain")
    save_params(params, out / "params.msgpack")
    return {"steps": cfg.pretrain_steps, "first_nll": losses[0], "final_nll": losses[-1]}


def stage_sft(run: _Run, out: Path) -> dict[str, Any]:
    """The warm-up: the formatted examples only, loss on the completions."""
    cfg = run.config
    examples = read_jsonl(run.out / "data" / "sft.jsonl")
    rng = np.random.default_rng(cfg.seed + 7)

    def batches():
        while True:
            chosen = [examples[i] for i in rng.integers(0, len(examples), cfg.sft_batch)]
            yield _batch(run, [e["prompt"] + e["completion"] for e in chosen],
                         [len(e["prompt"]) for e in chosen])

    params, losses = _train(run, load_params(run.out / "pretrain" / "params.msgpack"),
                            batches(), steps=cfg.sft_steps, lr=cfg.sft_lr, desc="math: sft")
    save_params(params, out / "params.msgpack")
    return {"steps": cfg.sft_steps, "examples": len(examples), "first_nll": losses[0],
            "final_nll": losses[-1]}


def _accuracy(run: _Run, params: Any, records: list[dict], batch: dict, key: jax.Array,
              temperature: float) -> tuple[np.ndarray, list[str]]:
    texts = run.complete(params, batch, key, temperature)
    correct = rewards.math_answer(None, texts, answer=[r["answer"] for r in records])
    return np.asarray(correct), texts


def _rl_config(run: _Run, estimator: str) -> rlhf.RLHFConfig:
    cfg = run.config
    return rlhf.GRPOConfig(max_new_tokens=cfg.max_new_tokens, eos_id=run.tokenizer.eos_id,
                           pad_id=run.tokenizer.padding_id, advantage=estimator,
                           samples_per_prompt=cfg.samples)


def stage_rl(run: _Run, out: Path, *, estimator: str) -> dict[str, Any]:
    """RL from the SFT model with ``math_answer`` as the only reward (β = 0, one update per
    batch, as TRL's GRPO defaults); the held-out greedy accuracy curve on the way."""
    cfg = run.config
    records = read_jsonl(run.out / "data" / "rl_prompts.jsonl")
    heldout = read_jsonl(run.out / "data" / "heldout.jsonl")
    eval_batch = run.prompts(heldout)
    config = _rl_config(run, estimator)
    optimizer = make_optimizer(cfg.rl_lr, total_steps=cfg.rl_iterations, warmup_steps=0)
    state = rlhf.init_rlhf_state(config, load_params(run.out / "sft" / "params.msgpack"),
                                 optimizer)
    step = rlhf.make_rlhf_step(run.model, None, None, config, policy_optimizer=optimizer,
                               reward_fns=[rewards.math_answer], tokenizer=run.tokenizer,
                               reward_columns={"answer": [r["answer"] for r in records]})
    prompts = run.prompts(records)
    curve: dict[str, list] = {"iteration": [], "heldout_greedy": [], "train_reward": []}
    key, train_reward = jax.random.key(cfg.seed + 60), []
    bar = progress(range(cfg.rl_iterations), desc=f"math: {estimator}", unit="it")
    began = time.perf_counter()
    for it in bar:
        if it % cfg.eval_every == 0:
            correct, _ = _accuracy(run, state.policy_params, heldout, eval_batch, key, 0.0)
            curve["iteration"].append(it)
            curve["heldout_greedy"].append(float(correct.mean()))
            curve["train_reward"].append(float(np.mean(train_reward)) if train_reward else None)
            train_reward = []
        rows = np.arange(it * cfg.rl_prompts, (it + 1) * cfg.rl_prompts) % len(records)
        batch = {k: v[rows] for k, v in prompts.items()} | {"index": rows.astype(np.int32)}
        state, metrics = step(state, batch, jax.random.fold_in(key, it))
        train_reward.append(float(metrics["score/mean"]))
        bar.set_postfix(reward=f"{train_reward[-1]:.2f}",
                        zero_std=f"{float(metrics['frac_reward_zero_std']):.2f}")
    correct, _ = _accuracy(run, state.policy_params, heldout, eval_batch, key, 0.0)
    curve["iteration"].append(cfg.rl_iterations)
    curve["heldout_greedy"].append(float(correct.mean()))
    curve["train_reward"].append(float(np.mean(train_reward)))
    save_params(state.policy_params, out / "params.msgpack")
    return {"estimator": estimator, "curve": curve, "rl_seconds": time.perf_counter() - began,
            "final_metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
            "config": {k: getattr(config, k) for k in (
                "advantage", "samples_per_prompt", "kl_coef", "kl_in", "loss_agg",
                "ppo_epochs", "num_minibatches", "clip_eps")} | {"lr": cfg.rl_lr}}


def _evaluation(run: _Run, params: Any, heldout: list[dict], batch: dict) -> dict[str, Any]:
    cfg = run.config
    greedy, texts = _accuracy(run, params, heldout, batch, jax.random.key(cfg.seed + 70), 0.0)
    sampled, _ = _accuracy(run, params, heldout, batch, jax.random.key(cfg.seed + 71), 1.0)
    low, high = bootstrap_ci(greedy, seed=cfg.seed)
    pair_ci = math_report.pair_bootstrap_ci(greedy, [(r["a"], r["b"]) for r in heldout],
                                            seed=cfg.seed)
    return {"accuracy": float(greedy.mean()), "accuracy_ci": [low, high],
            "accuracy_ci_pairs": list(pair_ci), "sampled_accuracy": float(sampled.mean()),
            "n": int(greedy.size), "correct": greedy.astype(int).tolist(),
            "completions": texts[:8]}


def stage_eval(run: _Run, out: Path) -> dict[str, Any]:
    heldout = read_jsonl(run.out / "data" / "heldout.jsonl")
    batch = run.prompts(heldout)
    result = {"sft": _evaluation(run, load_params(run.out / "sft" / "params.msgpack"), heldout,
                                 batch)}
    for estimator in run.config.estimators:
        params = load_params(run.out / f"rl_{estimator}" / "params.msgpack")
        result[estimator] = _evaluation(run, params, heldout, batch)
    result["prompts"] = [r["prompt"] for r in heldout[:8]]
    result["answers"] = [r["answer"] for r in heldout[:8]]
    return result


def run_math_demo(config: MathConfig, out: str | Path, *, start_time: float | None = None,
                  log=print) -> dict[str, Any]:
    """Runs (or resumes) every stage under ``out`` and writes the report; returns it."""
    start_time = time.perf_counter() if start_time is None else start_time
    load_start = os.getloadavg()[0]
    cache = StageCache(out, log=log)
    run, cfg = _Run(config, cache), config
    data_keys = ("seed", "max_operand", "heldout_fraction", "sft_pairs", "sft_examples_per_pair",
                 "sft_worked_share", "rl_iterations", "rl_prompts", "eval_prompts")
    results = {"load_start": load_start, "data": cache.run(
        "data", {"records": 2} | {k: getattr(cfg, k) for k in data_keys}, (),
        lambda d: stage_data(run, d))}
    results["tokenizer"] = cache.run("tokenizer", {"vocab_size": cfg.vocab_size}, ("data",),
                                     lambda d: stage_tokenizer(run, d))
    make_model(run)
    model_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "prompt_len",
                  "max_new_tokens", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                  "pretrain_worked_share")
    results["pretrain"] = cache.run("pretrain", {k: getattr(cfg, k) for k in model_keys},
                                    ("tokenizer",), lambda d: stage_pretrain(run, d))
    results["sft"] = cache.run("sft", {k: getattr(cfg, k) for k in (
        "sft_steps", "sft_batch", "sft_lr", "sft_worked_share")}, ("pretrain",),
        lambda d: stage_sft(run, d))
    rl_keys = ("rl_iterations", "rl_prompts", "samples", "rl_lr", "eval_every")
    results["rl"] = {}
    for estimator in cfg.estimators:
        results["rl"][estimator] = cache.run(
            f"rl_{estimator}", {k: getattr(cfg, k) for k in rl_keys}, ("sft",),
            lambda d, e=estimator: stage_rl(run, d, estimator=e))
    results["eval"] = cache.run("eval", {"estimators": list(cfg.estimators)},
                                tuple(f"rl_{e}" for e in cfg.estimators),
                                lambda d: stage_eval(run, d))
    return math_report.write_report(run, results, start_time=start_time)


def main(*, quick: bool, out: str | None, start_time: float) -> int:
    """``python -m jaxalign.demo --task math``: run, print the comparison and the targets;
    returns the exit status (1 if a target failed, unless ``quick``)."""
    out = out or "runs/demo_math"
    report = run_math_demo(QUICK if quick else FULL, out, start_time=start_time)
    print()
    print("\n".join(math_report.summary(report)))
    skipped = report["stages"]["skipped"]
    if skipped:
        print(f"\n{len(skipped)} stage(s) reused from {out} (cached): {', '.join(skipped)}")
    verdict = "all targets met" if report["passed"] else "SOME TARGETS FAILED"
    if not report["enforced"]:
        verdict += " (quick mode: not enforced)"
    print(f"\n{verdict}. Report: {out}/report.md")
    print(f"Total wall time: {time.perf_counter() - start_time:.1f} s (load average"
          f" {report['load_average']['start']:.2f} -> {report['load_average']['end']:.2f})")
    return 0 if report["passed"] or not report["enforced"] else 1
