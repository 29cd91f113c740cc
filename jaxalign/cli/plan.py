"""``jaxalign plan``: will a step fit a pod nobody has booked yet, and how fast could it run?

    jaxalign plan dpo --model llama-3-8b --mesh fsdp=8 --batch-size 8 --max-length 1024 \\
        --dtype bfloat16 --remat full [--json]

:func:`plan` runs :func:`plan_step` in a fresh Python process whose ``XLA_FLAGS`` ask for as many
CPU devices as the mesh has (``--xla_force_host_platform_device_count``, set before JAX starts
there; this process keeps its own devices). That process builds the real step of the command
(:mod:`jaxalign.cli.plan_steps`: the training commands' factories and ``compile_step``, on
``jax.ShapeDtypeStruct`` inputs — no weight is allocated), lowers and compiles it for the
simulated mesh, and reads what XLA reports per device (:func:`jaxalign.plan.compiled_costs`):
parameter, optimiser-state, reference and batch bytes, temp bytes, FLOPs three ways (model
FLOPs counted analytically, the compiled HLO's dot FLOPs times loop trip counts, and
``cost_analysis()``, which counts a scanned layer stack once) and collective bytes. Then each
chip of :data:`jaxalign.plan.ACCELERATORS` is checked: fits when the peak is at most
``--usable-fraction`` of its memory; its step time is at least the compiled FLOPs at the chip's
peak, and ``model FLOPs / (mfu × peak)`` at the assumed ``--mfu``.

Everything printed is an estimate for the program XLA:CPU compiles from the same shardings; it
is not a measured run on the chip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from jaxalign.cli.configs import PlanConfig
from jaxalign.cli.loop import RunError
from jaxalign.cli.options import ConfigError, build, checked, flat_values
from jaxalign.plan import ACCELERATORS, MODEL_SHAPES

__all__ = ["Planned", "compile_plan", "format_report", "model_config", "plan", "plan_step"]

_GIB = 2.0**30


def _mesh_sizes(spec: str) -> dict[str, int]:
    from jaxalign.sharding import MESH_AXES, parse_mesh_spec  # noqa: PLC0415

    try:
        sizes = parse_mesh_spec(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def model_config(config: PlanConfig) -> Any:
    """The :class:`~jaxalign.models.TransformerConfig` ``--model`` names, with
    ``--model-overrides``, ``--dtype``/``--param-dtype``/``--remat`` and ``--scan-layers``."""
    from jaxalign.cli.run_dir import config_from_dict  # noqa: PLC0415
    from jaxalign.cli.sources import is_run_dir  # noqa: PLC0415
    from jaxalign.models import PRESETS, TransformerConfig  # noqa: PLC0415
    from jaxalign.models.hf import config_from_hf  # noqa: PLC0415

    source = config.model
    try:
        if source in MODEL_SHAPES or source in PRESETS:
            base = MODEL_SHAPES.get(source) or PRESETS[source]
        elif is_run_dir(source):
            base = config_from_dict(json.loads(
                (_final(source) / "config.json").read_text())["model_config"])
        else:
            path = Path(source) / "config.json" if os.path.isdir(source) else Path(source)
            if not path.is_file():
                raise RunError(f"--model {source}: not a named shape ({', '.join(MODEL_SHAPES)}),"
                               f" a preset ({', '.join(PRESETS)}), a directory with a"
                               " config.json or a JSON file")
            fields = json.loads(path.read_text(encoding="utf-8"))
            base = config_from_hf(fields) if "model_type" in fields else TransformerConfig(
                **fields)
        overrides = {**config.model_overrides, **config.compute.overrides(),
                     "scan_layers": config.scan_layers}
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError, KeyError) as error:
        raise RunError(f"--model {source}: {error}") from None


def _final(source: str) -> Path:
    from jaxalign.cli.run_dir import final_dir  # noqa: PLC0415

    return final_dir(source)


class Planned(NamedTuple):
    """What :func:`compile_plan` made: the report, the compiled program (it runs on real arrays
    laid out like ``built``'s inputs) and the abstract step."""

    report: dict[str, Any]
    compiled: Any
    built: Any


def plan_step(config: PlanConfig, devices: Any = None) -> dict[str, Any]:
    """Compiles ``config.step`` for ``config.mesh`` on this process's ``devices`` (default: all;
    the mesh takes the first ones it needs) and returns the per-device report (a JSON-ready
    dict; see :mod:`jaxalign.cli.plan`)."""
    return compile_plan(config, devices).report


def compile_plan(config: PlanConfig, devices: Any = None) -> Planned:
    """:func:`plan_step`, also returning the compiled program and the abstract step."""
    import jax  # noqa: PLC0415

    from jaxalign import plan as costs  # noqa: PLC0415
    from jaxalign import sharding  # noqa: PLC0415
    from jaxalign.cli.plan_steps import (  # noqa: PLC0415
        abstract_step, parameter_total, state_field_bytes)
    from jaxalign.cli.run_dir import config_to_dict  # noqa: PLC0415

    sizes = _mesh_sizes(config.mesh)
    count = math.prod(sizes.values())
    devices = list(jax.devices() if devices is None else devices)
    if count > len(devices):
        raise RunError(f"--mesh {config.mesh} needs {count} devices; this process has"
                       f" {len(devices)} (jaxalign plan simulates them in a subprocess)")
    cfg = model_config(config)
    mesh = sharding.make_mesh(**sizes, devices=devices[:count])
    try:
        built = abstract_step(config, cfg, mesh)
    except ValueError as error:
        raise RunError(str(error)) from None
    began = time.perf_counter()
    lowered = built.step.lower(built.state, *built.args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    read = costs.compiled_costs(compiled, unknown_trip_count=built.loop_trips)
    fields = state_field_bytes(built.state)
    batch = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                for x in jax.tree.leaves(built.args))
    # What the run keeps on each device; XLA's argument bytes leave out inputs the step never
    # reads (jit drops them), which a run holds all the same.
    placed = sum(fields.values()) + batch
    outputs = read.output_bytes - read.alias_bytes
    rows, positions, vocab = built.logits
    split = sizes["data"] * sizes["fsdp"]
    logits = 4 * -(-rows // split) * positions * -(-vocab // sizes["tensor"])
    return Planned({
        "step": config.step, "model": config.model, "model_config": config_to_dict(cfg),
        "parameters": parameter_total(built.state),
        "mesh": sizes, "devices": count, "batch_size": config.batch_size, **built.shapes,
        "lower_s": lowered_at - began, "compile_s": compiled_at - lowered_at,
        "bytes_per_device": {
            **fields, "batch": batch, "arguments": placed, "arguments_xla": read.argument_bytes,
            "temp": read.temp_bytes, "outputs_not_donated": outputs,
            "peak": placed + read.temp_bytes + outputs, "logits_f32": logits},
        "flops_per_device": {"model": built.model_flops / count,
                             "compiled": read.hlo.dot_flops, "cost_analysis": read.xla_flops},
        "collectives_per_device": {
            kind: {"bytes": read.hlo.collective_bytes[kind],
                   "count": read.hlo.collective_counts[kind]}
            for kind in sorted(read.hlo.collective_bytes)},
        "loops_without_trip_count": read.hlo.unknown_loops,
        "assumed_trip_count": built.loop_trips,
    }, compiled, built)


def _fits(result: dict[str, Any], config: PlanConfig) -> list[dict[str, Any]]:
    """One row per chip: fits, free memory, step time at the peak and at ``config.mfu``."""
    peak = result["bytes_per_device"]["peak"]
    flops = result["flops_per_device"]
    rows = []
    for chip in ACCELERATORS:
        usable = chip.hbm_gib * _GIB * config.usable_fraction
        rows.append({"accelerator": chip.name, "hbm_gib": chip.hbm_gib,
                     "fits": peak <= usable, "free_gib": (usable - peak) / _GIB,
                     "step_s_at_peak": flops["compiled"] / (chip.peak_tflops * 1e12),
                     "step_s_at_mfu": flops["model"] / (config.mfu * chip.peak_tflops * 1e12)})
    return rows


def _child_env(devices: int) -> dict[str, str]:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def _run_child(config: PlanConfig) -> dict[str, Any]:
    """:func:`plan_step` in a fresh process with the mesh's number of CPU devices."""
    devices = math.prod(_mesh_sizes(config.mesh).values())
    values = json.dumps(flat_values(config), default=str)
    done = subprocess.run([sys.executable, "-m", "jaxalign.cli.plan"], input=values, text=True,
                          capture_output=True, env=_child_env(devices), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    if lines and "error" in json.loads(lines[-1]):
        raise RunError(json.loads(lines[-1])["error"])
    tail = "\n".join(done.stderr.strip().splitlines()[-8:])
    raise RunError(f"the planning process failed (exit {done.returncode}):\n{tail}")


def plan(config: PlanConfig) -> dict[str, Any]:
    """Runs ``jaxalign plan``: compiles in a subprocess, checks the chips, prints the tables (or
    one JSON line with ``--json``) and returns the report."""
    began = time.perf_counter()
    result = _run_child(config)
    result["accelerators"] = _fits(result, config)
    result["mfu"], result["usable_fraction"] = config.mfu, config.usable_fraction
    result["wall_s"] = time.perf_counter() - began
    print(json.dumps(result) if config.json else format_report(result))
    return result


def _size(value: float) -> str:
    """``value`` bytes as ``"3.74 GiB"`` (or MiB, KiB, B), right-aligned in 11 columns."""
    for unit, scale in (("GiB", _GIB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(value) >= scale:
            return f"{value / scale:7.2f} {unit}"
    return f"{value:7.0f} B  "


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:9.2f} {unit}"
    return f"{value:9.0f} FLOP"


def _count(value: float) -> str:
    return f"{value / 1e9:.2f} B" if value >= 1e9 else f"{value / 1e6:.2f} M"


_PARTS = {"params": "params", "optimizer_state": "optimizer state",
          "reference_params": "reference params", "value_params": "value params",
          "value_optimizer_state": "value optimizer state", "reward_params": "reward params",
          "other": "step, key, KL state", "batch": "batch"}


def _header(result: dict[str, Any]) -> list[str]:
    cfg = result["model_config"]
    remat = "none" if not cfg["remat"] else {"nothing": "full"}.get(cfg["remat_policy"], "dots")
    mesh = " ".join(f"{axis}={size}" for axis, size in result["mesh"].items())
    shape = (f"{result['rows']} rows x {result['length']} tokens" if "length" in result else
             f"{result['rows']} rows x ({result['prompt_length']} prompt +"
             f" {result['max_new_tokens']} new) tokens")
    return [
        f"jaxalign plan {result['step']}: {result['model']} ({_count(result['parameters'])}"
        f" parameters; compute {cfg['dtype']}, params {cfg['param_dtype']}, remat {remat},"
        f" {'scanned' if cfg['scan_layers'] else 'unrolled'} layers)",
        f"mesh {mesh} ({result['devices']} simulated CPU devices), {shape} per step;"
        f" lowered in {result['lower_s']:.1f} s, compiled in {result['compile_s']:.1f} s.",
        "A compiled estimate (XLA:CPU, same shardings), not a measured run.", ""]


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report of :func:`plan`'s result: memory, FLOPs, collectives, chips."""
    mem, flops = result["bytes_per_device"], result["flops_per_device"]
    lines = _header(result) + ["memory per device"]
    lines += [f"  {label:<26}{_size(mem[key])}" for key, label in _PARTS.items() if key in mem]
    lines += [f"  {'= arguments':<26}{_size(mem['arguments'])}   (XLA:"
              f" {_size(mem['arguments_xla']).strip()}, without inputs the step never reads)",
              f"  {'temp (activations, ...)':<26}{_size(mem['temp'])}   (one f32 full-vocabulary"
              f" logits tensor: {_size(mem['logits_f32']).strip()})",
              f"  {'outputs not donated':<26}{_size(mem['outputs_not_donated'])}",
              f"  {'peak estimate':<26}{_size(mem['peak'])}", "",
              "FLOPs per device and step",
              f"  {'model (analytic)':<26}{_flops(flops['model'])}   (no rematerialisation;"
              " what MFU counts)",
              f"  {'compiled':<26}{_flops(flops['compiled'])}   (the HLO's dots x loop trip"
              " counts)",
              f"  {'cost_analysis()':<26}{_flops(flops['cost_analysis'])}   (counts each loop"
              " body once)"]
    if result["loops_without_trip_count"]:
        lines.append(f"  ({result['loops_without_trip_count']} loop(s) without a known trip"
                     f" count counted {result['assumed_trip_count']}x: an upper bound)")
    collectives = result["collectives_per_device"]
    lines += ["", "collectives per device and step (the compiled HLO's, x loop trip counts)"]
    lines += [f"  {kind:<26}{_size(value['bytes'])}   in {value['count']:.0f}"
              for kind, value in collectives.items()] or ["  none"]
    mfu = f"s/step at {result['mfu']:.0%} MFU"
    lines += ["", f"  {'chip':<11}{'HBM GiB':>8}  {'fits':>4}  {'free GiB':>9}"
              f"  {'s/step at peak':>15}  {mfu:>20}"]
    lines += [f"  {row['accelerator']:<11}{row['hbm_gib']:8.1f}"
              f"  {'yes' if row['fits'] else 'no':>4}  {row['free_gib']:9.1f}"
              f"  {row['step_s_at_peak']:15.3g}  {row['step_s_at_mfu']:20.3g}"
              for row in result["accelerators"]]
    lines.append(f"fits: peak <= {result['usable_fraction']:.0%} of HBM; step time at peak:"
                 " compiled FLOPs / the chip's bf16 peak; at MFU: model FLOPs / (MFU x peak)."
                 f" Wall time {result['wall_s']:.1f} s.")
    return "\n".join(lines)


def _main() -> int:
    """The planning process: a flat :class:`PlanConfig` mapping as JSON on stdin, the report as
    one JSON line on stdout (``{"error": ...}`` and status 2 for a bad option)."""
    try:
        config = build(PlanConfig, checked(PlanConfig, json.loads(sys.stdin.read())))
        result = plan_step(config)
    except (ConfigError, RunError) as error:
        print(json.dumps({"error": str(error)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
