"""Throughput, model FLOP utilisation and peak memory of the compiled SFT, reward and DPO steps.

`bench` model config, 8 preference pairs x 128 tokens (32-token prompts). Each measurement runs
in a fresh subprocess so its peak resident memory (ru_maxrss) belongs to that step alone:

  jax_sft, jax_reward, jax_dpo (reference params in the state), jax_dpo_pre (precomputed
  reference log-probs), torch_dpo (the same DPO step in PyTorch + transformers: policy
  forward+backward, reference forward, AdamW), and matmul (the 2048^2 float32 matmul peak of
  this machine, measured in the same run).

The machine is shared and noisy, and interference only ever adds time, so every step time is
the fastest of `--steps` steps, the workers run `--rounds` times interleaved (jax, torch, jax,
torch, ...) and each side keeps its best round; ratios therefore compare best with best.
Prints a table and one flat JSON line; `--json` prints only the JSON line.

    python benchmarks/bench_steps.py [--steps 10] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    bench_config, forward_flops as _forward_flops, jax_bench_config, llama_config,
    matmul_peak_gflops, peak_rss_mb, spawn_worker,
)

PAIRS, SEQ, PROMPT = 8, 128, 32
THREADS = 2


def forward_flops(n_sequences: int) -> float:
    """Model FLOPs of one forward pass over ``n_sequences`` sequences of ``SEQ`` tokens."""
    return _forward_flops(bench_config(), n_sequences * SEQ, SEQ)


def step_flops(kind: str) -> float:
    sequences = 2 * PAIRS
    if kind == "sft":
        return 3 * forward_flops(sequences)       # forward + backward (2x forward)
    if kind == "reward":
        return 3 * forward_flops(sequences)
    if kind == "dpo":
        return 3 * forward_flops(sequences) + forward_flops(sequences)   # + reference forward
    if kind == "dpo_pre":
        return 3 * forward_flops(sequences)
    raise ValueError(kind)


def _batches(seed=0):
    import numpy as np

    cfg = bench_config()
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (2, PAIRS, SEQ)).astype(np.int32)
    attn = np.ones((PAIRS, SEQ), np.int32)
    comp = np.zeros((PAIRS, SEQ), np.int32)
    comp[:, PROMPT:] = 1
    pref = {"chosen_ids": ids[0], "rejected_ids": ids[1], "chosen_attention_mask": attn,
            "rejected_attention_mask": attn, "chosen_completion_mask": comp,
            "rejected_completion_mask": comp, "margin": np.zeros(PAIRS, np.float32),
            "p_chosen": np.ones(PAIRS, np.float32)}
    sft = {"input_ids": ids.reshape(2 * PAIRS, SEQ), "attention_mask": np.ones((2 * PAIRS, SEQ), np.int32),
           "completion_mask": np.concatenate([comp, comp])}
    return pref, sft


def worker_jax(kind: str, steps: int) -> dict:
    import jax

    from jaxalign import train
    from jaxalign.models import CausalLM, RewardModel, init_params

    cfg = jax_bench_config()
    pref, sft = _batches()
    opt = train.make_optimizer(1e-5, total_steps=1000)
    key = jax.random.key(0)
    if kind == "reward":
        model = RewardModel(cfg)
        state = train.create_train_state(init_params(model, key), opt, key)
        step, batch = train.make_reward_step(model, opt), pref
    elif kind == "sft":
        model = CausalLM(cfg)
        state = train.create_train_state(init_params(model, key), opt, key)
        step, batch = train.make_sft_step(model, opt), sft
    else:
        model = CausalLM(cfg)
        params = init_params(model, key)
        step = train.make_preference_step(model, opt, loss="dpo", beta=0.1)
        if kind == "dpo_pre":
            ref = train.make_reference_logps_fn(model)(params, pref)
            batch = {**pref, **jax.device_get(ref)}
            state = train.create_train_state(params, opt, key)
        else:
            batch = pref
            state = train.create_train_state(params, opt, key, ref_params=params)
    batch = jax.device_put(batch)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"step_s": min(times), "compile_s": compile_s,
            "peak_rss_mb": peak_rss_mb(), "loss": float(metrics["loss"])}


def worker_torch_dpo(steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = bench_config()
    hf_cfg = llama_config(cfg)
    policy = LlamaForCausalLM(hf_cfg)
    ref = LlamaForCausalLM(hf_cfg)
    ref.load_state_dict(policy.state_dict())
    ref.eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    pref, _ = _batches()
    ids = torch.from_numpy(__import__("numpy").concatenate([pref["chosen_ids"], pref["rejected_ids"]])).long()
    attn = torch.ones_like(ids)
    comp = torch.from_numpy(__import__("numpy").concatenate(
        [pref["chosen_completion_mask"], pref["rejected_completion_mask"]])).float()

    def seq_logps(model, ids):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logps = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
        return (logps * comp[:, 1:]).sum(-1)

    def step():
        with torch.no_grad():
            ref_logps = seq_logps(ref, ids)
        logps = seq_logps(policy, ids)
        pc, pr = logps.chunk(2)
        rc, rr = ref_logps.chunk(2)
        loss = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        return loss

    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": min(times), "compile_s": compile_s, "peak_rss_mb": peak_rss_mb()}


def _spawn(name: str, steps: int) -> dict:
    return spawn_worker(os.path.abspath(__file__), name, "--steps", str(steps))


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions per worker")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.worker == "matmul":
            result = matmul_peak_gflops()
        elif args.worker == "torch_dpo":
            result = worker_torch_dpo(args.steps)
        else:
            result = worker_jax(args.worker.removeprefix("jax_"), args.steps)
        print(json.dumps(result))
        return

    workers = ["matmul"] + [f"jax_{kind}" for kind in ("sft", "reward", "dpo", "dpo_pre")]
    if _have_torch():
        workers.append("torch_dpo")
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for worker in workers:
            name = worker.removeprefix("jax_")
            result = _spawn(worker, args.steps)
            best = results.get(name)
            if name == "matmul":
                if best is None or result["gflops"] > best["gflops"]:
                    results[name] = result
            elif best is None or result["step_s"] < best["step_s"]:
                results[name] = result
    peak = results["matmul"]["gflops"]
    tokens = 2 * PAIRS * SEQ

    rows = []
    for kind in ("sft", "reward", "dpo", "dpo_pre"):
        r = results[kind]
        flops_kind = "dpo_pre" if kind == "dpo_pre" else kind
        mfu = step_flops(flops_kind) / r["step_s"] / (peak * 1e9)
        rows.append((f"jaxalign {kind}", r["step_s"], tokens / r["step_s"], mfu, r["compile_s"], r["peak_rss_mb"]))
    if "torch_dpo" in results:
        r = results["torch_dpo"]
        mfu = step_flops("dpo") / r["step_s"] / (peak * 1e9)
        rows.append(("pytorch dpo", r["step_s"], tokens / r["step_s"], mfu, r["compile_s"], r["peak_rss_mb"]))

    summary = {
        "sft_tokens_per_s": round(tokens / results["sft"]["step_s"], 1),
        "reward_tokens_per_s": round(tokens / results["reward"]["step_s"], 1),
        "dpo_tokens_per_s": round(tokens / results["dpo"]["step_s"], 1),
        "dpo_precomputed_tokens_per_s": round(tokens / results["dpo_pre"]["step_s"], 1),
        "dpo_mfu": round(step_flops("dpo") / results["dpo"]["step_s"] / (peak * 1e9), 4),
        "matmul_peak_gflops": round(peak, 1),
        "dpo_peak_rss_mb": round(results["dpo"]["peak_rss_mb"], 1),
        "dpo_precomputed_peak_rss_mb": round(results["dpo_pre"]["peak_rss_mb"], 1),
    }
    if "torch_dpo" in results:
        torch_tps = tokens / results["torch_dpo"]["step_s"]
        summary.update({
            "torch_dpo_tokens_per_s": round(torch_tps, 1),
            "ratio_dpo_vs_torch": round(summary["dpo_tokens_per_s"] / torch_tps, 3),
            "torch_dpo_peak_rss_mb": round(results["torch_dpo"]["peak_rss_mb"], 1),
            "rss_ratio_dpo_vs_torch": round(results["dpo"]["peak_rss_mb"] / results["torch_dpo"]["peak_rss_mb"], 3),
            "rss_ratio_dpo_precomputed_vs_torch": round(
                results["dpo_pre"]["peak_rss_mb"] / results["torch_dpo"]["peak_rss_mb"], 3),
        })
    if not args.json:
        print(f"bench config, {PAIRS} pairs x {SEQ} tokens ({tokens} tokens/step), "
              f"matmul peak {peak:.1f} GFLOP/s, best of {args.steps} steps x {args.rounds} rounds")
        print(f"{'step':<22}{'s/step':>9}{'tokens/s':>11}{'MFU':>8}{'compile s':>11}{'peak RSS MB':>13}")
        for name, s, tps, mfu, comp, rss in rows:
            print(f"{name:<22}{s:>9.3f}{tps:>11.0f}{mfu:>8.1%}{comp:>11.2f}{rss:>13.0f}")
        if "torch_dpo" in results:
            print(f"DPO tokens/s ratio vs PyTorch: {summary['ratio_dpo_vs_torch']:.2f}x; peak RSS ratio "
                  f"{summary['rss_ratio_dpo_vs_torch']:.2f}x (precomputed reference "
                  f"{summary['rss_ratio_dpo_precomputed_vs_torch']:.2f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
