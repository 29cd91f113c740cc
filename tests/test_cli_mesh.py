"""``jaxalign dpo --mesh``: one process on 4 devices, and the same run as 2 processes of 2
devices each (JAX's distributed runtime over gloo), each reading only its data shards."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from test_cli import TINY, _pref_records, _write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import os, sys
    devices = sys.argv[1]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    from jaxalign.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_two_process_dpo_on_a_mesh_equals_one_process(tmp_path):
    data = _write_jsonl(tmp_path / "pref.jsonl", _pref_records(32))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)

    def flags(out):
        return ["dpo", "--data", str(data), "--out", str(out), "--mesh", "data=2,fsdp=2",
                "--steps", "4", "--batch-size", "8", "--lr", "3e-3", "--max-length", "32",
                "--log-every", "1", "--save-every", "2", "--no-progress",
                "--model-overrides", json.dumps({**TINY, "n_heads": 2, "n_kv_heads": 2})]

    base = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAXALIGN_"))}
    base["PYTHONPATH"] = ROOT
    port = str(_free_port())
    two_out = tmp_path / "two"
    procs = [subprocess.Popen(
        [sys.executable, str(script), "2", *flags(two_out)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env={**base, "JAXALIGN_COORDINATOR": f"127.0.0.1:{port}", "JAXALIGN_NUM_PROCESSES": "2",
             "JAXALIGN_PROCESS_ID": str(i)}) for i in range(2)]
    one = subprocess.run([sys.executable, str(script), "4", *flags(tmp_path / "one")],
                         env=base, capture_output=True, text=True, timeout=600)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    single, double = _metrics(tmp_path / "one"), _metrics(two_out)
    assert [m["step"] for m in double] == [1, 2, 3, 4] == [m["step"] for m in single]
    for a, b in zip(double, single):
        for name in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert double[-1]["loss"] < double[0]["loss"]
    # one set of files, written once: process 0's logs, collective checkpoints and final model
    assert sorted(p.name for p in (two_out / "checkpoints").iterdir()) == ["2", "4"]
    assert (two_out / "final" / "config.json").is_file()
    assert "jaxalign dpo: 4 steps" in outputs[0] and "jaxalign dpo: 4 steps" not in outputs[1]


def test_sft_and_rm_train_on_a_three_axis_mesh_in_process(tmp_path):
    """Every training command takes --mesh (here all three axes of the 8 forced devices)."""
    from jaxalign import cli
    from jaxalign.cli import run_dir
    from test_cli import _sft_records

    sft_data = _write_jsonl(tmp_path / "sft.jsonl", _sft_records(32))
    pref_data = _write_jsonl(tmp_path / "pref.jsonl", _pref_records(32))
    model = json.dumps({**TINY, "n_heads": 2, "n_kv_heads": 2})
    for kind, data, lr in (("sft", sft_data, "1e-2"), ("rm", pref_data, "3e-3")):
        out = tmp_path / kind
        assert cli.main([kind, "--data", str(data), "--out", str(out), "--mesh",
                         "data=2,fsdp=2,tensor=2", "--steps", "12", "--batch-size", "8",
                         "--lr", lr, "--max-length", "32", "--log-every", "1",
                         "--no-progress", "--model-overrides", model]) == 0
        losses = [m["loss"] for m in _metrics(out)]
        assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), (kind, losses)
        _, params, info = run_dir.load_final(out)
        assert info["kind"] == kind and jax_leaves_finite(params)


def jax_leaves_finite(tree):
    import jax

    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))
