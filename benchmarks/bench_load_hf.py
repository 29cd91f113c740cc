"""Peak host memory of ``jaxalign.models.load_hf`` on a ~100M-parameter Llama checkpoint.

    python benchmarks/bench_load_hf.py [--json] [--keep DIR]

The parent builds the checkpoint with transformers (vocab 32000, d 768, 8 layers, 12/4 heads,
d_ff 2048, untied: 99.5M parameters) and saves it in float32 and in bfloat16, one file each,
plus a float32 copy in 100 MB shards. Each measurement runs in a fresh process: it imports its
libraries, initialises the runtime, then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and loads; "peak MB" is the peak resident memory above the
resident memory just before the load (imports and runtime excluded), and the ratio divides it
by the checkpoint's bytes in the target dtype (the issue's target: ≤ 1.3×). transformers'
``from_pretrained`` (torch) is measured the same way for comparison. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import spawn_worker  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=False)
# (checkpoint, target dtype) pairs measured for jaxalign and for transformers
CASES = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"),
         ("bfloat16", "float32"), ("float32-sharded", "bfloat16")]
TORCH_CASES = [("float32", "float32"), ("bfloat16", "bfloat16")]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def _reset_peak() -> int:
    """Resets VmHWM to the current RSS; returns that RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _worker(library: str, path: str, dtype: str) -> dict:
    if library == "jaxalign":
        import jax
        import jax.numpy as jnp

        from jaxalign.models import load_hf

        jax.devices()
        jnp.zeros(1).block_until_ready()
        before = _reset_peak()
        start = time.perf_counter()
        _, params = load_hf(path, param_dtype=dtype)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        leaves = jax.tree.leaves(params)
        count = sum(leaf.size for leaf in leaves)
        target = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    else:
        import torch
        import transformers

        torch.set_num_threads(2)
        before = _reset_peak()
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch,
                                                                                      dtype))
        seconds = time.perf_counter() - start
        count = sum(p.numel() for p in model.parameters())
        target = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = _status_kb("VmHWM")
    return {"seconds": seconds, "peak_mb": (peak - before) / 1024, "params": count,
            "target_mb": target / 2**20, "ratio": (peak - before) * 1024 / target}


def _build(root: str) -> dict[str, str]:
    """Saves the checkpoint in float32, bfloat16 and float32 shards; returns their dirs."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    paths = {name: os.path.join(root, name) for name in
             ("float32", "float32-sharded", "bfloat16")}
    model.save_pretrained(paths["float32"], max_shard_size="10GB")
    model.save_pretrained(paths["float32-sharded"], max_shard_size="100MB")
    model.to(torch.bfloat16).save_pretrained(paths["bfloat16"], max_shard_size="10GB")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--keep", default=None, help="build the checkpoints here (kept)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return
    root = args.keep or tempfile.mkdtemp(prefix="bench_load_hf_")
    paths = _build(root)
    rows = []
    for library, cases in (("jaxalign", CASES), ("transformers", TORCH_CASES)):
        for checkpoint, dtype in cases:
            result = spawn_worker(__file__, library, paths[checkpoint], dtype)
            rows.append({"library": library, "checkpoint": checkpoint, "dtype": dtype, **result})
    if not args.json:
        print(f"{rows[0]['params'] / 1e6:.1f}M-parameter Llama checkpoint, peak host memory of"
              " one load above the process's memory before it")
        print("| loader | checkpoint file | params dtype | load s | peak MB | params MB |"
              " peak / params |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['library']} | {r['checkpoint']} | {r['dtype']} | {r['seconds']:.2f} |"
                  f" {r['peak_mb']:.0f} | {r['target_mb']:.0f} | {r['ratio']:.2f}x |")
    print(json.dumps({"benchmark": "load_hf", "rows": rows}))


if __name__ == "__main__":
    main()
