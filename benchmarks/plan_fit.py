"""Will it fit? ``jaxalign plan`` for Llama-3-8B and Qwen2.5-7B, DPO and PPO, on a few meshes.

Each row is one ``jaxalign plan STEP --json`` run (its own subprocess simulating the mesh's CPU
devices): bf16 compute, float32 params with float32 AdamW moments, full remat, scanned layers.
DPO: one preference pair of 1,024 tokens per batch shard (reference params in the state).
PPO: two prompts per batch shard, 768 prompt + 256 sampled tokens, GAE with a value model and a
reward model of the policy's shape, 2 epochs x 2 minibatches. A compiled estimate for XLA:CPU
from the same shardings, not a measured run on the chips. Prints the README's markdown table
and one JSON line (``--json``: only the JSON line).

    python benchmarks/plan_fit.py [--json] [--only llama-3-8b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

COMMON = ("--dtype", "bfloat16", "--remat", "full", "--json")
ROWS = [  # (model, step, mesh, batch shards)
    (model, step, mesh, shards)
    for model in ("llama-3-8b", "qwen2.5-7b")
    for step, meshes in (("dpo", (("fsdp=8", 8), ("fsdp=4,tensor=2", 4), ("fsdp=16", 16))),
                         ("ppo", (("fsdp=8", 8), ("fsdp=16", 16))))
    for mesh, shards in meshes
]
CHIPS = ("TPU v5e", "TPU v4", "TPU v6e", "A100 80GB", "H100 SXM", "TPU v5p", "H200")


def _plan(model: str, step: str, mesh: str, shards: int) -> dict:
    shape = (("--batch-size", str(shards), "--max-length", "1024") if step == "dpo" else
             ("--batch-size", str(2 * shards), "--max-length", "1024", "--max-new-tokens", "256"))
    command = [sys.executable, "-c", "import sys; from jaxalign.cli import main; sys.exit(main())",
               "plan", step, "--model", model, "--mesh", mesh, *shape, *COMMON]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[3:])} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command_s"] = time.perf_counter() - began
    return result


def _row(result: dict) -> str:
    mem = result["bytes_per_device"]
    gib = lambda value: f"{value / 2**30:.1f}"  # noqa: E731
    state = mem["arguments"] - mem["batch"]
    fits = [row["accelerator"] for row in result["accelerators"] if row["fits"]]
    h100 = next(r for r in result["accelerators"] if r["accelerator"] == "H100 SXM")
    mesh = ",".join(f"{k}={v}" for k, v in result["mesh"].items() if v > 1)
    return (f"| {result['model']} | {result['step']} | {mesh} | {result['batch_size']} |"
            f" {gib(state)} | {gib(mem['temp'])} | {gib(mem['peak'])} |"
            f" {', '.join(c for c in CHIPS if c in fits) or 'none'} |"
            f" {h100['step_s_at_mfu']:.2f} | {result['compile_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--only", help="rows of this model only")
    args = parser.parse_args()
    results = [_plan(*row) for row in ROWS if args.only in (None, row[0])]
    if not args.json:
        print("| model | step | mesh | batch | state GiB/device | temp GiB | peak GiB |"
              " fits (peak <= 90% of HBM) | s/step on H100 at 40% MFU | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for result in results:
            print(_row(result))
    print(json.dumps([{key: r[key] for key in ("model", "step", "mesh", "batch_size",
                                               "bytes_per_device", "flops_per_device",
                                               "compile_s", "command_s")} for r in results]))


if __name__ == "__main__":
    main()
