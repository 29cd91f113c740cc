"""DPO and SFT at real shapes (32k / 131k vocabularies, variable-length pairs) vs PyTorch.

jaxalign against PyTorch + transformers done the way TRL does it.

Model: the ``bench`` trunk (d 256, 4 layers, 8/4 heads, d_ff 688, untied head) with the vocab
of each row. Data: ``--batches`` steps of 8 preference pairs from one seeded length
distribution (prompt lengths log-normal with median 64, capped at 256; chosen and rejected
completions log-normal with median 96, capped so prompt + completion <= 512; token ids uniform),
the same token ids on both sides; SFT trains on the 16 (prompt, completion) sequences of the
same pairs. Each worker runs in a fresh process: a warm-up pass over the batches (jaxalign
compiles there), then a timed pass.

Columns: real tokens/s counts the tokens a padded batch holds that are not padding, on
PyTorch's definition for every row (a pair is prompt + chosen + prompt + rejected, even where
jaxalign's packing processes its prompt once), over the timed pass's total time; s/step is its
median; compile s the warm-up pass minus the timed pass; "peak MB" is the peak RSS of the
warm-up and timed passes minus the RSS once models and optimiser exist (jaxalign's includes
XLA compiling the step); "step MB" the same over the timed pass alone; "XLA temp MB" is
``memory_analysis().temp_size_in_bytes`` of the step compiled for the longest batch.

PyTorch rows (see ``_real_torch.py``): ``pytorch`` = full-vocabulary float32 logits and
log-softmax (the issue's baseline; the ratios are against it), ``pytorch fused`` = TRL 1.16's
``add_fused_lm_head`` (what ``DPOTrainer``/``SFTTrainer`` use by default now).

    python benchmarks/bench_real.py [--vocab 32768 131072] [--tasks dpo sft] [--batches 3]
        [--sft-vocab 32768] [--variants padded packed ...] [--torch-heads full fused] [--quick]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import high_water_mb, jax_bench_config, reset_high_water, rss_mb, spawn_worker  # noqa: E402

PAIRS, MAX_LEN, PROMPT_CAP = 8, 512, 256
PROMPT_MEDIAN, COMPLETION_MEDIAN, SIGMA = 64, 96, 0.6
TORCH_HEADS = ("full", "fused")


def sample_pairs(n_batches: int, vocab: int, seed: int = 0) -> list[list[tuple]]:
    """``n_batches`` lists of ``PAIRS`` ``(prompt, chosen, rejected)`` int32 id arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = lambda median, cap: np.clip(  # noqa: E731
        np.rint(rng.lognormal(np.log(median), SIGMA)), 1, cap).astype(int)
    batches = []
    for _ in range(n_batches):
        pairs = []
        for _ in range(PAIRS):
            p = int(lengths(PROMPT_MEDIAN, PROMPT_CAP))
            c, r = (int(lengths(COMPLETION_MEDIAN, MAX_LEN - p)) for _ in range(2))
            pairs.append(tuple(rng.integers(3, vocab, n).astype(np.int32) for n in (p, c, r)))
        batches.append(pairs)
    return batches


def sft_examples(pairs: list[tuple]) -> list[tuple]:
    """The 16 ``(prompt, completion)`` sequences of a step's pairs (chosen ones, then rejected)."""
    return [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]


def real_tokens(task: str, batch: list[tuple]) -> int:
    """Non-pad tokens of a step on PyTorch's definition."""
    rows = batch if task == "sft" else sft_examples(batch)
    return sum(len(p) + len(c) for p, c in rows)


# jaxalign rows: how batches are laid out ("padded": the data's length buckets, as `jaxalign
# dpo` does by default; "pairs"/"sequences": PackedLoader's fixed packed shape) and
# TransformerConfig overrides (e.g. the log-prob chunk, the attention kernel).
VARIANTS = {
    "padded": {"packing": "none", "model": {}},
    "packed": {"packing": "auto", "model": {}},
    "packed_blockwise": {"packing": "auto", "model": {"attention_impl": "blockwise"}},
}


def _examples(task: str, batch: list[tuple]):
    from jaxalign.data import Example

    if task == "sft":
        return [Example(p, (c,)) for p, c in batch]
    return [Example(p, (c, r)) for p, c, r in batch]


def _packed_batches(task: str, batches: list) -> list[dict]:
    """Each batch's examples packed into one fixed :class:`PackSpec`: the loader's defaults for
    the row length and head positions, capacity = the step's examples, and the fewest rows in
    which every batch of the run fits (so all steps share one shape and compile once)."""
    import numpy as np

    from jaxalign.data import DataConfig, Dataset, DataReport, PackedLoader, PackingConfig

    examples = [e for b in batches for e in _examples(task, b)]
    data = Dataset("sft" if task == "sft" else "preference", examples, DataConfig(max_length=MAX_LEN),
                   0, DataReport("bench_real"))
    per_batch = len(examples) // len(batches)
    kind = "sequences" if task == "sft" else "pairs"
    for rows in range(1, per_batch + 1):
        loader = PackedLoader(data, per_batch, PackingConfig(packing=kind, pack_rows=rows,
                                                             pack_capacity=per_batch))
        try:
            return [loader.collate(np.arange(i * per_batch, (i + 1) * per_batch))
                    for i in range(len(batches))]
        except ValueError:
            continue
    raise RuntimeError("no packed shape fits the batches")


def _jax_batches(task: str, variant: dict, batches: list) -> list[dict]:
    import numpy as np

    from jaxalign.data import DataConfig, Dataset, DataReport

    if variant["packing"] != "none":
        return _packed_batches(task, batches)
    out = []
    for batch in batches:
        examples = _examples(task, batch)
        data = Dataset("sft" if task == "sft" else "preference", examples,
                       DataConfig(max_length=MAX_LEN), 0, DataReport("bench_real"))
        out.append(data.collate(np.arange(len(examples))))
    return out


def _jax_step(task: str, variant: dict, vocab: int):
    import jax

    from jaxalign import train
    from jaxalign.models import CausalLM, init_params

    model = CausalLM(jax_bench_config(vocab_size=vocab, **variant["model"]))
    opt = train.make_optimizer(1e-5, total_steps=1000, weight_decay=0.0, max_grad_norm=1.0)
    key = jax.random.key(0)
    params = init_params(model, key)
    if task == "sft":
        step = train.make_sft_step(model, opt)
        state = train.create_train_state(params, opt, key)
    else:
        step = train.make_preference_step(model, opt, loss="dpo", beta=0.1)
        state = train.create_train_state(params, opt, key, ref_params=params)
    return step, state


def worker_jax(task: str, vocab: int, variant_name: str, batches: list) -> dict:
    import jax

    variant = VARIANTS[variant_name]
    step, state = _jax_step(task, variant, vocab)
    host = _jax_batches(task, variant, batches)
    key = next(k for k in ("ids", "input_ids", "chosen_ids") if k in host[0])
    shapes = [list(b[key].shape) for b in host]
    arrays = [jax.device_put(b) for b in host]
    jax.block_until_ready((state, arrays))
    base = rss_mb()
    reset_high_water()
    first, losses = [], []
    for batch in arrays:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        first.append(time.perf_counter() - start)
    first_peak = high_water_mb() - base
    reset_high_water()
    times = []
    for batch in arrays:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_peak = high_water_mb() - base
    longest = max(arrays, key=lambda b: max(int(x.size) for x in jax.tree.leaves(b)))
    analysis = step.lower(state, longest).compile().memory_analysis()
    return {"times": times, "compile_s": max(sum(first) - sum(times), 0.0), "base_rss_mb": base,
            "peak_mb": max(first_peak, step_peak), "step_peak_mb": step_peak,
            "xla_temp_mb": analysis.temp_size_in_bytes / 2**20, "first_loss": losses[0],
            "shapes": shapes}


def _worker(args) -> dict:
    task, side, option = args.worker.split(":")
    batches = sample_pairs(args.batches, args.worker_vocab)
    if task == "sft":
        batches = [sft_examples(b) for b in batches]
    if side == "torch":
        from _real_torch import run

        result = run(task, args.worker_vocab, option, batches)
    else:
        result = worker_jax(task, args.worker_vocab, option, batches)
    tokens = [real_tokens(task, b) for b in batches]
    result.update({"real_tokens": tokens, "tokens_per_s": sum(tokens) / sum(result["times"]),
                   "step_s": statistics.median(result["times"])})
    return result


def _spawn(name: str, vocab: int, batches: int) -> dict:
    try:
        return spawn_worker(os.path.abspath(__file__), name, "--worker-vocab", str(vocab),
                            "--batches", str(batches))
    except RuntimeError as error:  # e.g. killed for memory: report it, keep the other rows
        return {"error": str(error).splitlines()[-1][:200]}


def _row_names(task: str, variants: list[str], heads: list[str]) -> list[tuple[str, str]]:
    """``(worker, label)`` of each row of one task (the first one is the ratios' baseline)."""
    rows = [(f"{task}:torch:{head}", "pytorch" + ("" if head == "full" else " fused"))
            for head in heads]
    return rows + [(f"{task}:jax:{v}", f"jaxalign {v}") for v in variants]


def _summary_keys(prefix: str, r: dict, base: dict | None) -> dict:
    out = {f"{prefix}_tokens_per_s": round(r["tokens_per_s"], 1), f"{prefix}_step_s": round(r["step_s"], 3),
           f"{prefix}_compile_s": round(r["compile_s"], 2), f"{prefix}_peak_mb": round(r["peak_mb"], 1),
           f"{prefix}_step_peak_mb": round(r["step_peak_mb"], 1)}
    if "xla_temp_mb" in r:
        out[f"{prefix}_xla_temp_mb"] = round(r["xla_temp_mb"], 1)
    if base and "error" not in base:
        out[f"{prefix}_speed_ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        out[f"{prefix}_memory_ratio"] = round(r["peak_mb"] / base["peak_mb"], 3)
    return out


def _print_table(task: str, vocab: int, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{task.upper()}, vocab {vocab}")
    print(f"{'':<27}{'s/step':>8}{'real tok/s':>12}{'speed':>7}{'compile s':>10}{'peak MB':>9}"
          f"{'memory':>8}{'step MB':>9}{'XLA temp MB':>12}{'loss@0':>8}")
    base = rows[0][1]
    for label, r in rows:
        if "error" in r:
            print(f"{label:<27}  failed: {r['error']}")
            continue
        ok = "error" not in base
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if ok else "-"
        memory = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if ok else "-"
        temp = f"{r['xla_temp_mb']:.0f}" if "xla_temp_mb" in r else "-"
        print(f"{label:<27}{r['step_s']:>8.2f}{r['tokens_per_s']:>12.0f}{speed:>7}{r['compile_s']:>10.1f}"
              f"{r['peak_mb']:>9.0f}{memory:>8}{r['step_peak_mb']:>9.0f}{temp:>12}{r['first_loss']:>8.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tasks", nargs="+", default=["dpo", "sft"], choices=["dpo", "sft"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="jaxalign rows")
    parser.add_argument("--torch-heads", nargs="+", default=list(TORCH_HEADS), choices=TORCH_HEADS,
                        help="PyTorch rows (the first is the baseline of the ratios)")
    parser.add_argument("--batches", type=int, default=3, help="steps per pass (distinct batches)")
    parser.add_argument("--sft-vocab", type=int, nargs="+", default=[32768],
                        help="vocabularies SFT runs at (a subset of --vocab)")
    parser.add_argument("--quick", action="store_true", help="smoke run: vocab 4096, 1 batch")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.vocab, args.sft_vocab, args.batches = [4096], [4096], 1
    load = os.getloadavg()
    summary = {"batches": args.batches, "load_avg_1m_start": round(load[0], 2)}
    for vocab in args.vocab:
        for task in args.tasks:
            if task == "sft" and vocab not in args.sft_vocab:
                continue
            rows = [(label, _spawn(worker, vocab, args.batches))
                    for worker, label in _row_names(task, args.variants, args.torch_heads)]
            base = rows[0][1]
            for (worker, _), (_, r) in zip(_row_names(task, args.variants, args.torch_heads), rows):
                if "error" not in r:
                    _, side, option = worker.split(":")
                    prefix = f"{task}_{vocab}_{'torch' if side == 'torch' else 'jax'}_{option}"
                    summary.update(_summary_keys(prefix, r, None if r is base else base))
            if not args.json:
                _print_table(task, vocab, rows)
    summary["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if not args.json:
        print(f"\nload average (1 min) {summary['load_avg_1m_start']} at the start,"
              f" {summary['load_avg_1m_end']} at the end; {args.batches} batches per pass")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
