"""Seconds per RLHF (PPO) iteration: jaxalign's one compiled step vs the same iteration done the
way TRL does it in PyTorch + transformers, and the roofline of this machine.

`bench` config for policy, reference, value and reward models (its 4,096-token vocabulary, or
``--vocab``); 16 prompts x 32 tokens, 64 new tokens sampled at temperature 1; 2 PPO epochs x 2
minibatches. Each side runs in a fresh
subprocess so its peak resident memory belongs to it alone. The roofline is the iteration's
model FLOPs divided by a 2048^2 float32 matmul's FLOP/s measured in the same run: the fastest
this iteration could possibly run here. Memory: the peak RSS of each process, and that peak
minus the RSS once its models and optimiser exist (the iterations' own memory; jaxalign's
includes XLA compiling the step).

    python benchmarks/bench_rlhf.py [--iterations 5] [--vocab 32768] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    bench_config as _bench_config, forward_flops as _forward_flops, jax_bench_config,
    llama_config, matmul_peak_gflops, peak_rss_mb, rss_mb, spawn_worker,
)

BATCH, PROMPT, NEW = 16, 32, 64
EPOCHS, MINIBATCHES = 2, 2
THREADS = 2
VOCAB: int | None = None  # --vocab: None keeps the bench preset's


def bench_config():
    return _bench_config(VOCAB)


def forward_flops(tokens: int, context: int) -> float:
    return _forward_flops(bench_config(), tokens, context)


def iteration_flops() -> dict:
    seq = PROMPT + NEW
    tokens = BATCH * seq
    sample = forward_flops(BATCH * PROMPT, PROMPT) + forward_flops(BATCH * NEW, seq)
    score = 4 * forward_flops(tokens, seq)                       # policy, reference, value, reward
    update = EPOCHS * 2 * 3 * forward_flops(tokens, seq)          # policy + value, fwd + bwd
    return {"sample": sample, "score": score, "update": update, "total": sample + score + update}


def _prompts():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, bench_config().vocab_size, (BATCH, PROMPT)).astype(np.int32)
    return ids, np.ones_like(ids)


def worker_jax(iterations: int) -> dict:
    import jax

    from jaxalign import train
    from jaxalign.train import rlhf
    from jaxalign.models import CausalLM, RewardModel, ValueModel, init_params
    from jaxalign.sampling import make_generate

    cfg = jax_bench_config(**({} if VOCAB is None else {"vocab_size": VOCAB}))
    policy, value, reward = CausalLM(cfg), ValueModel(cfg), RewardModel(cfg)
    config = rlhf.RLHFConfig(max_new_tokens=NEW, temperature=1.0, ppo_epochs=EPOCHS,
                             num_minibatches=MINIBATCHES, kl_coef=0.05)
    opt = train.make_optimizer(1e-6, total_steps=1000)
    policy_params = init_params(policy, jax.random.key(0))
    reward_params = init_params(reward, jax.random.key(1))
    state = rlhf.init_rlhf_state(config, policy_params, opt, reward_params=reward_params,
                                 value_optimizer=opt)
    step = rlhf.make_rlhf_step(policy, value, reward, config, policy_optimizer=opt,
                               value_optimizer=opt)
    ids, mask = _prompts()
    prompts = jax.device_put({"prompt_ids": ids, "prompt_mask": mask})
    jax.block_until_ready((state, prompts))
    base = rss_mb()

    start = time.perf_counter()
    state, metrics = step(state, prompts, jax.random.key(0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(iterations):
        start = time.perf_counter()
        state, metrics = step(state, prompts, jax.random.key(i + 1))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    rss = peak_rss_mb()  # of the iterations alone, before the sampler below is compiled

    # sampling alone, with the same compiled sampler the step embeds
    generate = make_generate(policy, max_new_tokens=NEW, temperature=1.0)
    jax.block_until_ready(generate(state.policy_params, ids, mask, jax.random.key(0)))
    sample_times = []
    for i in range(iterations):
        start = time.perf_counter()
        jax.block_until_ready(generate(state.policy_params, ids, mask, jax.random.key(i)))
        sample_times.append(time.perf_counter() - start)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"iteration_s": median(times), "sample_s": median(sample_times),
            "compile_s": compile_s, "peak_rss_mb": rss, "base_rss_mb": base,
            "response_length": float(metrics["response_length"])}


def worker_torch(iterations: int) -> dict:
    """One PPO iteration as TRL's PPOTrainer does it: generate, then separate policy,
    reference, value and reward forward passes, GAE, and PPO epochs over minibatches."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM, LlamaModel

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = bench_config()
    hf = llama_config(cfg, pad_token_id=0, eos_token_id=None, bos_token_id=None)

    class ScalarModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = LlamaModel(hf)
            self.head = torch.nn.Linear(cfg.d_model, 1)

        def forward(self, ids, attn):
            return self.head(self.backbone(input_ids=ids, attention_mask=attn).last_hidden_state).squeeze(-1)

    policy, ref = LlamaForCausalLM(hf), LlamaForCausalLM(hf)
    ref.load_state_dict(policy.state_dict())
    value, reward = ScalarModel(), ScalarModel()
    ref.eval().requires_grad_(False)
    reward.eval().requires_grad_(False)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-6)
    ids_np, mask_np = _prompts()
    prompt = torch.from_numpy(ids_np).long()
    prompt_mask = torch.from_numpy(mask_np).long()
    base = rss_mb()

    def logprobs_of(model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, PROMPT - 1:-1].float()
        return torch.gather(logits.log_softmax(-1), 2, ids[:, PROMPT:, None]).squeeze(2), logits

    def iteration():
        timings = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = policy.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, use_cache=True)
        timings["sample_s"] = time.perf_counter() - t0
        attn = torch.ones_like(seq)
        with torch.no_grad():
            old_logps, _ = logprobs_of(policy, seq, attn)
            ref_logps, _ = logprobs_of(ref, seq, attn)
            old_values = value(seq, attn)[:, PROMPT - 1:-1]
            scores = reward(seq, attn)[:, -1]
            rewards = -0.05 * (old_logps - ref_logps)
            rewards[:, -1] += scores
            adv = torch.zeros_like(rewards)
            last = torch.zeros(BATCH)
            for t in reversed(range(NEW)):
                next_v = old_values[:, t + 1] if t + 1 < NEW else torch.zeros(BATCH)
                delta = rewards[:, t] + next_v - old_values[:, t]
                last = delta + 0.95 * last
                adv[:, t] = last
            returns = adv + old_values
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        mb = BATCH // MINIBATCHES
        for _ in range(EPOCHS):
            order = torch.randperm(BATCH)
            for start in range(0, BATCH, mb):
                idx = order[start:start + mb]
                logps, logits = logprobs_of(policy, seq[idx], attn[idx])
                ratio = torch.exp(logps - old_logps[idx])
                pg = -torch.min(ratio * adv[idx], ratio.clamp(0.8, 1.2) * adv[idx]).mean()
                v = value(seq[idx], attn[idx])[:, PROMPT - 1:-1]
                v_clip = old_values[idx] + (v - old_values[idx]).clamp(-0.2, 0.2)
                vf = 0.5 * torch.max((v - returns[idx]) ** 2, (v_clip - returns[idx]) ** 2).mean()
                probs = F.softmax(logits, -1)
                ent = (torch.logsumexp(logits, -1) - (probs * logits).sum(-1)).mean()
                loss = pg + 0.1 * vf - 0.0 * ent
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
        timings["iteration_s"] = time.perf_counter() - t0
        return timings

    first = iteration()
    runs = [iteration() for _ in range(iterations)]
    median = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
    return {"iteration_s": median("iteration_s"), "sample_s": median("sample_s"),
            "compile_s": first["iteration_s"] - median("iteration_s"), "peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base}


def _spawn(name: str, iterations: int) -> dict:
    vocab = () if VOCAB is None else ("--vocab", str(VOCAB))
    return spawn_worker(os.path.abspath(__file__), name, "--iterations", str(iterations), *vocab)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per side")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the bench preset's)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global VOCAB
    VOCAB = args.vocab
    if args.worker:
        fn = {"jax": worker_jax, "torch": worker_torch, "matmul": lambda n: matmul_peak_gflops()}[args.worker]
        print(json.dumps(fn(args.iterations)))
        return

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    peak = _spawn("matmul", args.iterations)["gflops"]
    jax_r = _spawn("jax", args.iterations)
    torch_r = _spawn("torch", args.iterations) if have_torch else None
    flops = iteration_flops()
    roofline_s = flops["total"] / (peak * 1e9)
    summary = {
        "iteration_s": round(jax_r["iteration_s"], 4),
        "sample_s": round(jax_r["sample_s"], 4),
        "update_s": round(jax_r["iteration_s"] - jax_r["sample_s"], 4),
        "compile_s": round(jax_r["compile_s"], 2),
        "roofline_s": round(roofline_s, 4),
        "roofline_ratio": round(jax_r["iteration_s"] / roofline_s, 3),
        "matmul_peak_gflops": round(peak, 1),
        "peak_rss_mb": round(jax_r["peak_rss_mb"], 1),
        "step_mb": round(jax_r["peak_rss_mb"] - jax_r["base_rss_mb"], 1),
    }
    if VOCAB is not None:
        summary["vocab"] = VOCAB
    if torch_r:
        summary.update({
            "torch_iteration_s": round(torch_r["iteration_s"], 4),
            "torch_sample_s": round(torch_r["sample_s"], 4),
            "ratio_vs_torch": round(torch_r["iteration_s"] / jax_r["iteration_s"], 3),
            "torch_peak_rss_mb": round(torch_r["peak_rss_mb"], 1),
            "rss_ratio_vs_torch": round(jax_r["peak_rss_mb"] / torch_r["peak_rss_mb"], 3),
            "torch_step_mb": round(torch_r["peak_rss_mb"] - torch_r["base_rss_mb"], 1),
        })
        summary["step_mb_ratio_vs_torch"] = round(summary["step_mb"] / summary["torch_step_mb"], 3)
    if not args.json:
        print(f"bench config (vocab {bench_config().vocab_size}) x4 models, {BATCH} prompts x {PROMPT} tokens, {NEW} new tokens, "
              f"{EPOCHS} epochs x {MINIBATCHES} minibatches; matmul peak {peak:.1f} GFLOP/s; "
              f"iteration {flops['total'] / 1e9:.0f} GFLOP")
        print(f"{'':<12}{'iteration s':>12}{'sample s':>10}{'update s':>10}{'compile s':>11}{'peak RSS MB':>13}{'step MB':>9}")
        print(f"{'jaxalign':<12}{jax_r['iteration_s']:>12.3f}{jax_r['sample_s']:>10.3f}"
              f"{summary['update_s']:>10.3f}{jax_r['compile_s']:>11.2f}{jax_r['peak_rss_mb']:>13.0f}"
              f"{summary['step_mb']:>9.0f}")
        if torch_r:
            print(f"{'pytorch':<12}{torch_r['iteration_s']:>12.3f}{torch_r['sample_s']:>10.3f}"
                  f"{torch_r['iteration_s'] - torch_r['sample_s']:>10.3f}{torch_r['compile_s']:>11.2f}"
                  f"{torch_r['peak_rss_mb']:>13.0f}{summary['torch_step_mb']:>9.0f}")
        print(f"{'roofline':<12}{roofline_s:>12.3f}")
        if torch_r:
            print(f"speed-up vs PyTorch loop: {summary['ratio_vs_torch']:.2f}x; iteration / roofline: "
                  f"{summary['roofline_ratio']:.2f}x; peak RSS ratio {summary['rss_ratio_vs_torch']:.2f}x"
                  f" (above the models and optimiser: {summary['step_mb_ratio_vs_torch']:.2f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
