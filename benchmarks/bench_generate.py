"""New tokens per second of ``jaxalign.sampling.generate`` vs ``transformers``' ``generate``.

Setup (the ``bench`` preset: vocab 4096, d 256, 4 layers, 8/4 heads, d_ff 688): 16 prompts of
32 tokens, 64 new tokens each, sampling at temperature 1 over the full vocabulary, no EOS (both
sides always produce all 64 tokens). The same weights run in both: the jaxalign params are
written with ``save_hf`` and loaded by ``LlamaForCausalLM.from_pretrained``. Timed calls of the
two implementations alternate (with a short pause between calls, so neither runtime's spinning
worker threads slow the other), so load from other processes hits both alike; the median of
``--repeats`` calls is reported. Throughput counts the whole call (prefill + decode) and
excludes compilation, which is reported separately (first call minus the median call).

Usage: ``python benchmarks/bench_generate.py [--repeats 5] [--dtype float32] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import CausalLM, get_config, init_params, save_hf
from jaxalign.sampling import generate

_PAUSE_S = 0.3


def _time_jax(model, params, prompt_ids, prompt_mask, seed, new_tokens) -> float:
    start = time.perf_counter()
    out = generate(model, params, prompt_ids, prompt_mask, jax.random.key(seed),
                   max_new_tokens=new_tokens, temperature=1.0)
    jax.block_until_ready(out)
    return time.perf_counter() - start


def _torch_runner(model, params, prompt_ids, prompt_mask, new_tokens, threads):
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
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=0, use_cache=True,
            )
        elapsed = time.perf_counter() - start
        assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
        return elapsed

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="jaxalign compute dtype")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)

    config = get_config("bench", dtype=args.dtype)
    model = CausalLM(config)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.prompt_len)
    prompt_ids = jnp.asarray(rng.integers(1, config.vocab_size, shape), jnp.int32)
    prompt_mask = jnp.ones(shape, jnp.int32)
    new = args.batch * args.new_tokens

    first = _time_jax(model, params, prompt_ids, prompt_mask, 0, args.new_tokens)
    torch_run = None
    if not args.no_torch:
        torch_run = _torch_runner(model, params, prompt_ids, prompt_mask, args.new_tokens,
                                  args.torch_threads)
        if torch_run is not None:
            torch_run(0)  # warm-up
    jax_times, torch_times = [], []
    for r in range(1, args.repeats + 1):
        # The pause lets the other runtime's worker threads stop spinning before a timing.
        time.sleep(_PAUSE_S)
        jax_times.append(_time_jax(model, params, prompt_ids, prompt_mask, r, args.new_tokens))
        if torch_run is not None:
            time.sleep(_PAUSE_S)
            torch_times.append(torch_run(r))

    jax_s = statistics.median(jax_times)
    result = {
        "tokens_per_s": round(new / jax_s, 1),
        "compile_s": round(max(first - jax_s, 0.0), 3),
        "torch_tokens_per_s": None,
        "ratio_vs_torch": None,
    }
    if torch_times:
        torch_s = statistics.median(torch_times)
        result["torch_tokens_per_s"] = round(new / torch_s, 1)
        result["ratio_vs_torch"] = round(torch_s / jax_s, 2)

    if not args.json:
        print(f"bench config, batch {args.batch}, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, temperature 1, {args.repeats} repeats (median); "
              f"jax {jax.__version__} on {jax.devices()[0].platform}, dtype {args.dtype}")
        print(f"{'implementation':<28}{'median s':>10}{'new tok/s':>12}{'compile s':>11}")
        print(f"{'jaxalign generate':<28}{jax_s:>10.3f}{result['tokens_per_s']:>12.0f}"
              f"{result['compile_s']:>11.2f}")
        if torch_times:
            print(f"{'transformers generate':<28}{torch_s:>10.3f}"
                  f"{result['torch_tokens_per_s']:>12.0f}{'-':>11}")
            print(f"ratio (jaxalign / transformers tokens/s): {result['ratio_vs_torch']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
