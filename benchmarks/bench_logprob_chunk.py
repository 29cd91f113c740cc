"""How the chunk size of the chunked LM head trades time for memory (the ``--logprob-chunk`` default).

One forward+backward of ``Σ log p(targets)`` over ``N`` tokens with hidden size ``D``:
``dense`` builds the ``[N, V]`` float32 logits (what the steps did before), ``chunk C`` is
:func:`jaxalign.token_logprobs_from_hidden` with ``chunk_size=C`` (the vocabulary is split too
when ``C·V`` exceeds ``MAX_CHUNK_LOGITS``). Prints a table (best of ``--repeats`` seconds, the
compiled program's XLA temporary bytes, both as ratios to dense, measured in one run) and one
JSON line.

    PYTHONPATH=. python benchmarks/bench_logprob_chunk.py [--vocab 32768 131072] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jaxalign import gather_logprobs, token_logprobs_from_hidden


def _measure(fn, hidden, weight, repeats):
    compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(hidden, weight).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(hidden, weight))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(hidden, weight))
        times.append(time.perf_counter() - start)
    return min(times), temp


def run(vocab, tokens, width, chunks, repeats):
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (tokens, width))
    weight = 0.05 * jax.random.normal(keys[1], (width, vocab))
    targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
    variants = {"dense": lambda h, w: jnp.sum(gather_logprobs(h @ w, targets))}
    for chunk in chunks:
        variants[f"chunk {chunk}"] = (lambda c: lambda h, w: jnp.sum(
            token_logprobs_from_hidden(h, w, targets, chunk_size=c)))(chunk)
    rows = []
    for name, fn in variants.items():
        seconds, temp = _measure(fn, hidden, weight, repeats)
        rows.append({"vocab": vocab, "tokens": tokens, "impl": name, "s": round(seconds, 3),
                     "temp_mib": round(temp, 1)})
    dense = rows[0]
    for row in rows:
        row["time_vs_dense"] = round(row["s"] / dense["s"], 2)
        row["memory_vs_dense"] = round(row["temp_mib"] / dense["temp_mib"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    rows = [row for vocab in args.vocab
            for row in run(vocab, args.tokens, args.width, args.chunks, args.repeats)]
    if not args.json:
        print("| V | impl | s (fwd+bwd) | vs dense | XLA temp MiB | vs dense |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['vocab']} | {r['impl']} | {r['s']} | {r['time_vs_dense']}x |"
                  f" {r['temp_mib']} | {r['memory_vs_dense']}x |")
    print(json.dumps({"bench": "logprob_chunk", "rows": rows}))


if __name__ == "__main__":
    main()
