"""The run behind ``jaxalign rs``: rejection-sampling fine-tuning (RAFT / ReST-style) with
:func:`jaxalign.train.best_of_n.rejection_sampling_finetune`, scored by a reward model.

Every round samples ``--n`` completions for every prompt of ``--prompts`` (all of them, as one
batch), keeps the best-scoring one per prompt and takes ``--steps-per-round`` SFT steps on them.
A run directory ``DIR`` (``--out``) holds::

    metrics.jsonl   one JSON object per round: {"step" (the round, from 1), "score/mean" (all
                    samples: the policy's own reward), "score/best" (the kept ones), "loss"
                    (SFT loss of the round's last step), "lr" (at the round's first step)}
    tb/             TensorBoard event files, the same scalars
    final/          the policy (load_final, --init-from, --policy read it); hf/ with --export-hf
    summary.json    what :func:`rs` returns

There are no checkpoints: a run is ``--rounds`` rounds in one go.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import train as steps
from jaxalign.train.best_of_n import rejection_sampling_finetune
from jaxalign.train.scorers import reward_model_scorer
from jaxalign.cli.configs import RSConfig
from jaxalign.cli.run_dir import save_final
from jaxalign.cli.loop import RunError, RunLog, write_summary
from jaxalign.distributed import is_main_process
from jaxalign.cli.sources import load_policy_run, stop_tokens

__all__ = ["rs"]


def rs(config: RSConfig) -> dict[str, Any]:
    """Runs one ``jaxalign rs`` job; returns the summary (also in summary.json)."""
    began = time.perf_counter()
    run = load_policy_run("rs", config)
    out = Path(config.out).absolute()
    if (out / "final" / "config.json").is_file():
        raise RunError(f"{out} already holds a finished run; choose another --out")
    init_key, key = jax.random.split(jax.random.key(config.seed))
    params = run.make_policy_params(init_key)
    prompts = run.prompts.collate(np.arange(len(run.prompts)))
    total_updates = config.rounds * config.steps_per_round
    options = config.optimizer_options(total_updates)
    optimizer = steps.make_optimizer(**options)
    schedule = steps.optimizer_schedule(**options)
    # positions the sampler runs per round (prompt + new tokens, n samples per prompt)
    positions = config.n * (int(prompts["prompt_mask"].sum())
                            + len(run.prompts) * config.max_new_tokens)

    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, "rs", total=config.rounds, start=0, progress=config.progress,
                 headline="score/mean", enabled=is_main_process())
    started = time.perf_counter()

    def log_round(round_index: int, entry: dict[str, float]) -> None:
        log.add_tokens(positions)
        metrics = {"score/mean": entry["mean_score"], "score/best": entry["best_score"],
                   "loss": entry["sft_loss"]}
        lr = float(schedule(round_index * config.steps_per_round))
        log.log(round_index + 1, metrics, {"lr": lr})
        log.bar.update(1)

    try:
        params, history = rejection_sampling_finetune(
            run.policy, params, reward_model_scorer(run.reward, run.reward_params), prompts,
            key, optimizer=optimizer, n=config.n, rounds=config.rounds,
            steps_per_round=config.steps_per_round, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature, eos_id=stop_tokens(run.tokenizer),
            pad_id=run.tokenizer.padding_id, callback=log_round)
        tokens_per_s = log.steady_rate(started)
    finally:
        log.close()
    final, hf_dir = save_final(out, "rs", run.policy, params, run.tokenizer, total_updates,
                               config.export_hf)
    wall_time = time.perf_counter() - began
    summary = {
        "kind": "rs", "rounds": config.rounds, "steps": total_updates, "history": history,
        "final_score": history[-1]["mean_score"], "wall_time_s": wall_time,
        "tokens": log.tokens, "tokens_per_s": tokens_per_s, "out": str(out),
        "final_dir": str(final), "hf_dir": hf_dir and str(hf_dir),
    }
    write_summary(out, summary)
    if is_main_process():
        scores = " -> ".join(f"{entry['mean_score']:.4f}" for entry in history)
        print(f"jaxalign rs: {config.rounds} rounds of best-of-{config.n} +"
              f" {config.steps_per_round} SFT steps, mean score per round {scores}, {wall_time:.1f} s -> {final}")
    return summary
