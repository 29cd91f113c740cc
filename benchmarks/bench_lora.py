"""DPO with every parameter trained vs LoRA (r = 16), in jaxalign and in PyTorch + peft.

Two model shapes: the ``bench`` preset (8 pairs x 128 tokens) and a ~100M-parameter Llama
(``--big``: vocab 16384, d 768, 12 layers, 12 heads, d_ff 2048; 2 pairs x 128 tokens). Each of
the four steps (jaxalign full / LoRA, torch full / peft LoRA) runs in a fresh subprocess
(``_common.spawn_worker``), float32, 2 threads:

* full: the policy trained by AdamW and a frozen reference copy (TRL's default);
* LoRA: adapters on q,k,v,o,gate,up,down (alpha 32, no dropout), base frozen; the reference is
  the same weights with the adapters off (jaxalign: the tree without ``lora_*`` leaves; peft:
  ``with model.disable_adapter()``, as TRL does), so no second copy exists.

Memory, per worker (Linux ``/proc/self/status``): ``base`` is the resident set once the models
and the optimiser state exist (torch's AdamW state is created up front, as its first step
would; jaxalign's step is compiled ahead of time once the weights' random-init executable is
dropped, which a run that loads its weights never has; then ``malloc_trim`` on both sides),
``peak`` is the high-water mark over the timed steps after resetting it (``clear_refs``), and
``step`` is ``peak - base``. jaxalign also reports XLA's ``memory_analysis()`` of the step: its
arguments (the state the step reads: weights, optimiser state, reference, batch) and temp
bytes, whose sum is the step's own memory without the runtime (``..._state_and_temp_ratio``).
Step time is the fastest of ``--steps`` steps; tokens/s counts chosen + rejected tokens.

``--sequential-scheduler`` adds both jaxalign steps compiled with XLA:CPU's
concurrency-optimised scheduler off (``--xla_cpu_enable_concurrency_optimized_scheduler=false``),
which trades its parallelism for fewer live temporaries.

    python benchmarks/bench_lora.py [--steps 3] [--shapes bench,100m] [--sequential-scheduler]
                                    [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_config, llama_config, spawn_worker  # noqa: E402

THREADS, RANK, ALPHA, SEQ, PROMPT = 2, 16, 32.0, 128, 32
SHAPES = {"bench": ({}, 8),
          "100m": (dict(vocab_size=16384, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048), 2)}
SEQUENTIAL = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def _settle() -> float:
    """Freed heap back to the OS, the high-water mark reset; returns the resident MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _rss_mb()


def _batch(cfg, pairs: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (2, pairs, SEQ)).astype(np.int32)
    ones = np.ones((pairs, SEQ), np.int32)
    comp = np.zeros((pairs, SEQ), np.int32)
    comp[:, PROMPT:] = 1
    return {"chosen_ids": ids[0], "rejected_ids": ids[1], "chosen_attention_mask": ones,
            "rejected_attention_mask": ones, "chosen_completion_mask": comp,
            "rejected_completion_mask": comp}


def _timed(step, steps: int) -> dict:
    base = _settle()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss_mb("VmHWM")
    return {"step_s": min(times), "base_mb": base, "peak_mb": peak, "step_mb": peak - base}


def worker_jax(shape: str, use_lora: bool, steps: int) -> dict:
    import jax

    from jaxalign import train
    from jaxalign.models import CausalLM, get_config, init_params, lora
    from jaxalign.train.lora import lora_optimizer

    overrides, pairs = SHAPES[shape]
    model = CausalLM(get_config("bench", **overrides))
    key = jax.random.key(0)
    params = init_params(model, key)
    optimizer = train.make_optimizer(1e-5, total_steps=1000)
    if use_lora:
        model = lora.with_lora(model, RANK, alpha=ALPHA)
        params = lora.init_lora(model, params, jax.random.key(1))
        optimizer = lora_optimizer(optimizer)
        state = train.create_train_state(params, optimizer, key)
    else:
        state = train.create_train_state(params, optimizer, key, ref_params=params)
    del params
    # A training run loads its weights: the cached executable that drew these random ones
    # (136 MiB resident on the 110M model) is no part of a step's memory, on either side.
    jax.clear_caches()
    step = train.make_preference_step(model, optimizer, loss="dpo", beta=0.1)
    batch = jax.device_put(_batch(model.config, pairs))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    temp_mb = analysis.temp_size_in_bytes / 2**20
    args_mb = analysis.argument_size_in_bytes / 2**20
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, *step.bound)
        jax.block_until_ready(metrics)
        holder["loss"] = float(metrics["loss"])

    run()  # first execution (buffers, thread pools) outside the measurement
    result = _timed(run, steps)
    params = holder["state"].params
    masks = jax.tree.leaves(lora.trainable_mask(params)) if use_lora else None
    trainable = sum(x.size for i, x in enumerate(jax.tree.leaves(params))
                    if masks is None or masks[i])
    return {**result, "compile_s": compile_s, "xla_temp_mb": temp_mb, "xla_args_mb": args_mb,
            "loss": holder["loss"],
            "trainable": int(trainable)}


def worker_torch(shape: str, use_lora: bool, steps: int) -> dict:
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    overrides, pairs = SHAPES[shape]
    cfg = bench_config()
    for name, value in overrides.items():
        setattr(cfg, name, value)
    cfg.resolved_head_dim = cfg.d_model // cfg.n_heads
    policy = LlamaForCausalLM(llama_config(cfg))
    if use_lora:
        import peft

        policy = peft.get_peft_model(policy, peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
            task_type="CAUSAL_LM"))
        ref, reference = policy, policy.disable_adapter
    else:
        ref = LlamaForCausalLM(llama_config(cfg))
        ref.load_state_dict(policy.state_dict())
        ref.eval().requires_grad_(False)
        reference = contextlib.nullcontext
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    for p in trainable:  # AdamW's state, created up front as its first step would
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}
    batch = _batch(cfg, pairs)
    ids = torch.from_numpy(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])).long()
    comp = torch.from_numpy(np.concatenate([batch["chosen_completion_mask"]] * 2)).float()

    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
        logps = torch.gather(logits.float().log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
        return (logps * comp[:, 1:]).sum(-1)

    def run():
        with torch.no_grad(), reference():
            ref_logps = seq_logps(ref)
        pc, pr = seq_logps(policy).chunk(2)
        rc, rr = ref_logps.chunk(2)
        loss = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    opt.zero_grad(set_to_none=True)  # gradients live within a step, as in jaxalign's
    return {**_timed(run, steps), "compile_s": first_s,
            "trainable": int(sum(p.numel() for p in trainable))}


def _row(name: str, r: dict, tokens: int) -> str:
    temp = (f"{r['xla_args_mb']:>9.0f}{r['xla_temp_mb']:>9.0f}" if "xla_temp_mb" in r
            else f"{'-':>9}{'-':>9}")
    return (f"{name:<16}{r['step_s']:>8.3f}{tokens / r['step_s']:>10.0f}{r['base_mb']:>9.0f}"
            f"{r['peak_mb']:>9.0f}{r['step_mb']:>9.0f}{temp}{r['trainable'] / 1e6:>10.2f}")


def _measure(shape: str, steps: int, torch_too: bool, sequential: bool) -> dict:
    script = os.path.abspath(__file__)
    names = ["jax_full", "jax_lora"] + (["jaxseq_full", "jaxseq_lora"] if sequential else [])
    names += ["torch_full", "torch_lora"] if torch_too else []
    return {n: spawn_worker(script, n, "--shape", shape, "--steps", str(steps)) for n in names}


def _summary(shape: str, results: dict) -> dict:
    full, low = results["jax_full"], results["jax_lora"]
    out = {f"{shape}_lora_peak_ratio": round(low["peak_mb"] / full["peak_mb"], 3),
           f"{shape}_lora_step_mem_ratio": round(low["step_mb"] / full["step_mb"], 3),
           f"{shape}_lora_xla_temp_ratio": round(low["xla_temp_mb"] / full["xla_temp_mb"], 3),
           f"{shape}_lora_xla_state_and_temp_ratio": round(
               (low["xla_args_mb"] + low["xla_temp_mb"]) / (full["xla_args_mb"]
                                                            + full["xla_temp_mb"]), 3),
           f"{shape}_lora_speedup": round(full["step_s"] / low["step_s"], 3)}
    if "torch_lora" in results:
        peft_run = results["torch_lora"]
        out.update({f"{shape}_lora_peak_vs_peft": round(low["peak_mb"] / peft_run["peak_mb"], 3),
                    f"{shape}_lora_step_mem_vs_peft": round(low["step_mb"] / peft_run["step_mb"],
                                                            3),
                    f"{shape}_lora_tokens_per_s_vs_peft": round(peft_run["step_s"]
                                                                / low["step_s"], 3)})
    if "jaxseq_lora" in results:
        seq = results["jaxseq_lora"]
        out.update({f"{shape}_seq_lora_peak_vs_full": round(seq["peak_mb"] / full["peak_mb"], 3),
                    f"{shape}_seq_lora_peak_vs_seq_full": round(
                        seq["peak_mb"] / results["jaxseq_full"]["peak_mb"], 3)})
        if "torch_lora" in results:
            out[f"{shape}_seq_lora_peak_vs_peft"] = round(
                seq["peak_mb"] / results["torch_lora"]["peak_mb"], 3)
    for name, r in results.items():
        out.update({f"{shape}_{name}_{k}": round(v, 3) for k, v in r.items() if k != "loss"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--shapes", default="bench,100m", help="model shapes, of bench,100m")
    parser.add_argument("--sequential-scheduler", action="store_true",
                        help="also the jaxalign steps with XLA's concurrency-optimised"
                        " scheduler off")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        side, kind = args.worker.split("_")
        if side == "jaxseq":  # before JAX is imported
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SEQUENTIAL}"
        worker = worker_torch if side == "torch" else worker_jax
        print(json.dumps(worker(args.shape, kind == "lora", args.steps)))
        return
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        torch_too = True
    except ImportError:
        torch_too = False
    summary = {}
    for shape in args.shapes.split(","):
        results = _measure(shape, args.steps, torch_too, args.sequential_scheduler)
        summary.update(_summary(shape, results))
        if not args.json:
            tokens = 2 * SHAPES[shape][1] * SEQ
            print(f"\n{shape}: DPO, {SHAPES[shape][1]} pairs x {SEQ} tokens, float32, LoRA r ="
                  f" {RANK} on q,k,v,o,gate,up,down; memory in MiB")
            print(f"{'step':<16}{'s/step':>8}{'tokens/s':>10}{'base':>9}{'peak':>9}"
                  f"{'step':>9}{'XLA arg':>9}{'XLA tmp':>9}{'train M':>10}")
            for name, r in results.items():
                label = name.replace("jaxseq", "jaxalign-seq").replace("jax_", "jaxalign_")
                print(_row(label.replace("torch_lora", "torch+peft"), r, tokens))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
