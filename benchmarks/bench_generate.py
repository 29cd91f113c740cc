"""New tokens per second of ``jaxalign.sampling.generate`` vs ``transformers``' ``generate``.

Setup (the ``bench`` preset: vocab 4096, d 256, 4 layers, 8/4 heads, d_ff 688): 16 prompts of
32 tokens, 64 new tokens each, sampling at temperature 1 over the full vocabulary, no EOS (both
sides always produce all 64 tokens). The same float32 weights run everywhere: the jaxalign
params are written with ``save_hf`` and loaded by ``LlamaForCausalLM.from_pretrained``;
jaxalign runs them with bfloat16 compute (the params stay float32, cast once per call) and,
as a second row, in float32. Timed calls of all implementations alternate, with a short pause
between calls, so load from other processes hits each alike; the median of ``--repeats`` calls
is reported, and the speed-up is the median of the per-round time ratios (robust to the load
drifting between rounds). Each timed call directly follows an untimed one of the same
implementation, so every implementation is measured in steady state, as in a sampling loop
(after an idle pause of ~0.3 s this shared VM runs the next call ~20% slower, for both).
Throughput counts the whole call (prefill + decode). Compilation is reported separately (first
call minus the median call).

The roofline row divides the FLOPs of one call (every matmul the sampler runs, attention over
the whole preallocated cache included) by a measured 2048×2048 matmul rate in the same dtype.

Usage: ``python benchmarks/bench_generate.py [--repeats 9] [--dtypes bfloat16,float32]
[--top-k K] [--top-p P] [--json]`` (the filters apply to both sides; off by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import CausalLM, TransformerConfig, get_config, init_params, save_hf
from jaxalign.sampling import generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import matmul_peak_gflops  # noqa: E402

_PAUSE_S = 0.05


def _jax_runner(config, params, prompt_ids, prompt_mask, new_tokens, top_k=0, top_p=1.0):
    model = CausalLM(config)

    def run(seed: int) -> float:
        start = time.perf_counter()
        out = generate(model, params, prompt_ids, prompt_mask, jax.random.key(seed),
                       max_new_tokens=new_tokens, temperature=1.0, top_k=top_k, top_p=top_p)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    return run


def _torch_runner(model, params, prompt_ids, prompt_mask, new_tokens, threads, top_k=0,
                  top_p=1.0):
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, params, tmp)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf_model.eval()
    ids = torch.tensor(np.asarray(prompt_ids), dtype=torch.long)
    mask = torch.tensor(np.asarray(prompt_mask), dtype=torch.long)

    def run(seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=top_k,
                top_p=top_p, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=0, use_cache=True,
            )
        elapsed = time.perf_counter() - start
        assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
        return elapsed

    return run


def generate_flops(config: TransformerConfig, batch: int, prompt_len: int, new: int) -> float:
    """Matmul FLOPs of one ``generate`` call (prefill of P tokens, N − 1 decode steps)."""
    d, h, kv, dh, f = (config.d_model, config.n_heads, config.n_kv_heads,
                       config.resolved_head_dim, config.d_ff)
    per_token = 2 * config.n_layers * (d * (h + 2 * kv) * dh + h * dh * d + 3 * d * f)
    slots = prompt_len + new - 1  # attention always spans the whole preallocated cache
    attention_per_query = 2 * 2 * config.n_layers * h * dh * slots
    queries = batch * (prompt_len + new - 1)
    lm_head = 2 * d * config.vocab_size * batch * new  # last prompt position + each step
    return queries * (per_token + attention_per_query) + lm_head


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="jaxalign compute dtypes; the first is the one in the JSON line")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter on both sides (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filter on both sides")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)

    base = get_config("bench")
    params = init_params(CausalLM(base), jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.prompt_len)
    prompt_ids = jnp.asarray(rng.integers(1, base.vocab_size, shape), jnp.int32)
    prompt_mask = jnp.ones(shape, jnp.int32)
    new = args.batch * args.new_tokens

    runners, first = {}, {}
    for dtype in args.dtypes.split(","):
        config = get_config("bench", dtype=dtype)
        runners[f"jaxalign generate ({dtype})"] = _jax_runner(
            config, params, prompt_ids, prompt_mask, args.new_tokens, args.top_k, args.top_p)
        first[f"jaxalign generate ({dtype})"] = runners[f"jaxalign generate ({dtype})"](0)
    if not args.no_torch:
        torch_run = _torch_runner(CausalLM(base), params, prompt_ids, prompt_mask,
                                  args.new_tokens, args.torch_threads, args.top_k, args.top_p)
        if torch_run is not None:
            torch_run(0)  # warm-up
            runners["transformers generate (float32)"] = torch_run
    times = {name: [] for name in runners}
    for r in range(1, args.repeats + 1):
        for name, run in runners.items():
            time.sleep(_PAUSE_S)  # let the other runtime's worker threads stop spinning
            run(1000 + r)  # untimed: the timed call then finds the caches and CPUs busy, as in a loop
            times[name].append(run(r))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    torch_name = "transformers generate (float32)"
    # Each round times every implementation within a second or so; the median of the per-round
    # ratios is robust to the load drifting between rounds (other processes on the machine).
    ratio = {name: (statistics.median(t / j for t, j in zip(times[torch_name], ts))
                    if torch_name in times else None) for name, ts in times.items()}

    primary = next(iter(runners))
    result = {
        "tokens_per_s": round(new / median[primary], 1),
        "compile_s": round(max(first[primary] - median[primary], 0.0), 3),
        "torch_tokens_per_s": round(new / median[torch_name], 1) if torch_name in median else None,
        "ratio_vs_torch": round(ratio[primary], 2) if ratio[primary] is not None else None,
        "dtype": args.dtypes.split(",")[0], "top_k": args.top_k, "top_p": args.top_p,
    }
    if args.json:
        print(json.dumps(result))
        return result

    flops = generate_flops(base, args.batch, args.prompt_len, args.new_tokens)
    filters = "".join([f", top_k {args.top_k}" if args.top_k else "",
                       f", top_p {args.top_p}" if args.top_p < 1 else ""])
    print(f"bench config, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, temperature 1{filters}; median of {args.repeats} interleaved calls; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; {flops / 1e9:.1f} GFLOP/call")
    print(f"{'implementation':<34}{'median s':>10}{'new tok/s':>11}{'vs torch':>10}"
          f"{'compile s':>11}")
    for name in runners:
        compile_s = f"{first[name] - median[name]:.2f}" if name in first else "-"
        vs_torch = ratio[name] if ratio[name] is not None else float("nan")
        print(f"{name:<34}{median[name]:>10.3f}{new / median[name]:>11.0f}{vs_torch:>9.2f}x"
              f"{compile_s:>11}")
    for dtype in args.dtypes.split(","):
        gflops = matmul_peak_gflops(repeats=5, dtype=dtype)["gflops"]
        seconds = flops / (gflops * 1e9)
        print(f"{'roofline (' + dtype + ', ' + format(gflops, '.0f') + ' GFLOP/s)':<34}"
              f"{seconds:>10.3f}{new / seconds:>11.0f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
