"""What a compiled step costs on each device, read from XLA before any array exists.

A step lowered with ``jax.ShapeDtypeStruct`` inputs (carrying their shardings) and compiled for
a mesh of simulated devices is one SPMD program per device; :func:`compiled_costs` reads from it

* **memory** — ``compiled.memory_analysis()``: argument, output, aliased (donated) and temp
  bytes per device; the peak estimate is ``argument + output − alias + temp``;
* **FLOPs**, two ways — ``cost_analysis()["flops"]`` counts the body of a loop (a scanned
  layer stack, the sampler's decode loop, PPO's epochs) **once**, whatever its trip count; so
  :func:`hlo_costs` also walks the compiled HLO and sums the FLOPs of every ``dot``
  (``2 · |output| · |contracted dims|``), each multiplied by the trip counts of the loops around
  it (XLA's ``known_trip_count``; a loop without one — a ``while_loop`` that may stop early — is
  counted ``unknown_trip_count`` times, an upper bound);
* **collectives** — every all-gather, all-reduce, reduce-scatter, all-to-all and
  collective-permute in the HLO, with its bytes (the larger of its operands and its result: the
  gathered array of an all-gather, the full input of a reduce-scatter), times its loop trip
  counts. ``cost_analysis`` on CPU reports none.

:func:`forward_flops` is the analytic count the MFU convention uses (model FLOPs, no
rematerialisation), and :data:`ACCELERATORS` the chips a plan is checked against.

These are estimates of the program XLA:CPU compiles for the mesh. A TPU or GPU compiler makes
the same SPMD partitioning decisions from the same shardings but fuses, schedules and lays out
buffers its own way (TPUs pad minor dimensions to tiles), so expect its temp bytes to differ.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

from jaxalign.models import TransformerConfig

__all__ = ["ACCELERATORS", "Accelerator", "CompiledCosts", "HloCosts", "MODEL_SHAPES",
           "compiled_costs", "forward_flops", "hlo_costs", "parameter_count"]


class Accelerator(NamedTuple):
    """One chip: ``hbm_gib`` of device memory and ``peak_tflops`` dense bf16 matmul peak."""

    name: str
    hbm_gib: float
    peak_tflops: float
    source: str


#: Vendor figures per chip. GPU memory is what the driver reports (H100 80 GB: 81,559 MiB).
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("TPU v4", 32.0, 275.0, "cloud.google.com/tpu/docs/v4"),
    Accelerator("TPU v5e", 16.0, 197.0, "cloud.google.com/tpu/docs/v5e"),
    Accelerator("TPU v5p", 95.0, 459.0, "cloud.google.com/tpu/docs/v5p"),
    Accelerator("TPU v6e", 32.0, 918.0, "cloud.google.com/tpu/docs/v6e"),
    Accelerator("A100 80GB", 80.0, 312.0, "NVIDIA A100 datasheet (bf16 dense)"),
    Accelerator("H100 SXM", 79.6, 989.0, "NVIDIA H100 datasheet (bf16 dense)"),
    Accelerator("H200", 140.4, 989.0, "NVIDIA H200 datasheet (bf16 dense)"),
)

#: Real models' shapes as jaxalign configs (from their HF ``config.json``; no weights).
#: Llama-3-8B has no rope scaling (Llama-3.1's ``rope_type: llama3`` is another model);
#: Qwen2.5-7B's sliding window is off (``use_sliding_window: false``).
MODEL_SHAPES: dict[str, TransformerConfig] = {
    "llama-3-8b": TransformerConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=500000.0, norm_eps=1e-5, max_len=8192),
    "qwen2.5-7b": TransformerConfig(
        vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
        rope_theta=1000000.0, norm_eps=1e-6, max_len=32768, qkv_bias=True),
}

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{([0-9,]*)\}")


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array in an HLO shape (one array, or a tuple of them)."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(shape)]


def _bytes(shape: str) -> float:
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in _arrays(shape))


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


class _Instruction(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: list[str]  # operand instruction names
    attributes: str


def _parse_instruction(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    name, rest = match.groups()
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode = re.match(r"[\w\-]+", rest)
    if opcode is None or not rest[opcode.end():].startswith("("):
        return None
    close = _balanced(rest, opcode.end())
    operands = re.findall(r"%([\w.\-]+)", rest[opcode.end():close])
    return _Instruction(name, shape, opcode.group(), operands, rest[close:])


def _computations(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """``({computation name: instructions}, entry name)`` of an HLO module's text."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if current is None:
            if line.endswith("{") and not line.startswith((" ", "HloModule")):
                header = line.split()
                is_entry = header[0] == "ENTRY"
                current = header[1 if is_entry else 0].lstrip("%")
                computations[current] = []
                entry = current if is_entry else entry
        elif line.strip() == "}":
            current = None
        else:
            instruction = _parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    return computations, entry


class HloCosts(NamedTuple):
    """Per-device costs of one execution, loops counted by their trip counts.

    Attributes:
      dot_flops: FLOPs of every ``dot``.
      collective_bytes: ``{kind: bytes}`` (e.g. ``"all-gather"``).
      collective_counts: ``{kind: executions}``.
      unknown_loops: loops without a known trip count (each counted ``unknown_trip_count``
        times).
    """

    dot_flops: float
    collective_bytes: dict[str, float]
    collective_counts: dict[str, float]
    unknown_loops: int


def _scaled(costs: HloCosts, factor: float) -> HloCosts:
    return HloCosts(costs.dot_flops * factor,
                    {k: v * factor for k, v in costs.collective_bytes.items()},
                    {k: v * factor for k, v in costs.collective_counts.items()},
                    costs.unknown_loops)


def _added(a: HloCosts, b: HloCosts) -> HloCosts:
    merge = lambda x, y: {k: x.get(k, 0) + y.get(k, 0) for k in {*x, *y}}  # noqa: E731
    return HloCosts(a.dot_flops + b.dot_flops, merge(a.collective_bytes, b.collective_bytes),
                    merge(a.collective_counts, b.collective_counts),
                    a.unknown_loops + b.unknown_loops)


_ZERO = HloCosts(0.0, {}, {}, 0)


def _own_costs(ins: _Instruction, shapes: dict[str, str]) -> HloCosts:
    """The FLOPs of a ``dot`` or the bytes of a collective (zero for anything else)."""
    if ins.opcode == "dot":
        lhs = _arrays(shapes.get(ins.operands[0], "")) if ins.operands else []
        contracting = _CONTRACTING.search(ins.attributes)
        if not lhs or contracting is None:
            return _ZERO
        dims = lhs[0][1]
        contracted = math.prod(dims[int(i)] for i in contracting.group(1).split(",") if i)
        out = _arrays(ins.shape)
        return HloCosts(2.0 * math.prod(out[0][1] if out else ()) * contracted, {}, {}, 0)
    kind = ins.opcode.removesuffix("-start")
    if kind in _COLLECTIVES and not ins.opcode.endswith("-done"):
        size = max(_bytes(ins.shape), sum(_bytes(shapes.get(o, "")) for o in ins.operands))
        return HloCosts(0.0, {kind: size}, {kind: 1}, 0)
    return _ZERO


def hlo_costs(hlo_text: str, *, unknown_trip_count: int = 1) -> HloCosts:
    """Dot FLOPs and collective bytes of a compiled HLO module (``compiled.as_text()``), each
    instruction counted as often as the loops around it run.

    A ``while`` with XLA's ``known_trip_count`` runs that often; one without counts
    ``unknown_trip_count`` times (and is counted in ``unknown_loops``). Of a conditional's
    branches the costliest counts. Fusions and calls count once per execution of their caller.
    """
    computations, entry = _computations(hlo_text)
    memo: dict[str, HloCosts] = {}

    def cost(name: str) -> HloCosts:
        if name in memo:
            return memo[name]
        memo[name] = _ZERO  # a (malformed) cycle adds nothing
        instructions = computations.get(name, [])
        shapes = {ins.name: ins.shape for ins in instructions}
        total = _ZERO
        for ins in instructions:
            total = _added(total, _own_costs(ins, shapes))
            called = _CALLED.findall(ins.attributes)
            for group in _CALLED_LISTS.findall(ins.attributes):
                called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            if ins.opcode == "while":
                trip = _TRIP_COUNT.search(ins.attributes)
                body = _ZERO
                for c in called:
                    body = _added(body, cost(c))
                count = int(trip.group(1)) if trip else unknown_trip_count
                body = _scaled(body, count)
                total = _added(total, body._replace(unknown_loops=body.unknown_loops
                                                    + (trip is None)))
            elif ins.opcode == "conditional" and called:
                total = _added(total, max((cost(c) for c in called), key=lambda c: c.dot_flops))
            else:
                for c in called:
                    total = _added(total, cost(c))
        memo[name] = total
        return total

    return cost(entry)


class CompiledCosts(NamedTuple):
    """What :func:`compiled_costs` reads from one compiled program (per device)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int  # argument + output − alias + temp
    xla_flops: float  # cost_analysis(): loop bodies counted once
    hlo: HloCosts  # loops counted by their trip counts


def compiled_costs(compiled: Any, *, unknown_trip_count: int = 1) -> CompiledCosts:
    """Memory, FLOPs and collectives of a ``jax.stages.Compiled`` (see the module docstring)."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    return CompiledCosts(
        argument, output, alias, temp, argument + output - alias + temp,
        float((cost or {}).get("flops", 0.0)),
        hlo_costs(compiled.as_text(), unknown_trip_count=unknown_trip_count))


def parameter_count(config: TransformerConfig, *, lm_head: bool = True) -> int:
    """Parameters of a Llama/Qwen2-layout :class:`~jaxalign.models.CausalLM` (biases on q/k/v
    only; ``lm_head=False``: without the output projection), counted from the shapes, LoRA
    adapters (``config.lora_rank``) included. Other layouts raise rather than give a wrong
    count."""
    other = [name for name in ("o_bias", "mlp_bias", "qk_norm", "post_norms")
             if getattr(config, name)]
    if other:
        raise ValueError(f"parameter_count covers the Llama/Qwen2 layout; this config sets {other}")
    d, hd = config.d_model, config.resolved_head_dim
    attention = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    if config.qkv_bias:
        attention += hd * (config.n_heads + 2 * config.n_kv_heads)
    per_layer = attention + 3 * d * config.d_ff + 2 * d + _adapter_count(config)
    head = d * config.vocab_size if lm_head and not config.tie_embeddings else 0
    return config.n_layers * per_layer + config.vocab_size * d + d + head


def _adapter_count(config: TransformerConfig) -> int:
    """One layer's LoRA adapters, ``r · (fan_in + fan_out)`` per target (0 without LoRA)."""
    if not config.lora_rank:
        return 0
    d, q, kv = config.d_model, config.n_heads * config.resolved_head_dim, (
        config.n_kv_heads * config.resolved_head_dim)
    fans = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, config.d_ff),
            "up": (d, config.d_ff), "down": (config.d_ff, d)}
    return config.lora_rank * sum(sum(fans[t]) for t in config.lora_targets)


def forward_flops(config: TransformerConfig, rows: int, length: int, *,
                  head_positions: int | None = None, context: int | None = None) -> float:
    """Model FLOPs of one forward pass over ``rows × length`` tokens.

    ``2·N_matmul`` per token for the layers' weights (the embedding is a gather), plus
    ``4 · Dh · H · context`` per token and layer for the attention scores and their weighted
    sum (``QKᵀ`` and ``PV``; jaxalign computes the full ``length × context`` square, masked, so
    the count is not halved for causality), plus ``2 · D · V`` per position that reaches the LM
    head (``head_positions`` per row, default ``length``; 0 for a reward or value model). The
    backward pass costs twice the forward (so a training step is ``3×``, plus one more forward
    when blocks are rematerialised, which model FLOPs leave out — PaLM, arXiv:2204.02311, B).

    Args:
      config: the model's shape.
      rows: sequences ``B``.
      length: tokens per sequence ``T``.
      head_positions: positions per row projected onto the vocabulary.
      context: key positions each token attends to (default ``length``; the cache length when
        decoding).
    """
    d, hd, layers = config.d_model, config.resolved_head_dim, config.n_layers
    context = length if context is None else context
    head_positions = length if head_positions is None else head_positions
    weights = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads) + 3 * d * config.d_ff
    tokens = rows * length
    return float(2 * tokens * layers * weights + 4 * tokens * layers * context * config.n_heads * hd
                 + 2 * rows * head_positions * d * config.vocab_size)
