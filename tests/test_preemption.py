"""Preemption-safe runs: SIGTERM checkpoints the step in flight and exits 143; SIGKILL at any
step (in the middle of a checkpoint save too) loses nothing; a damaged latest checkpoint is
reported, set aside and the previous one used; a full disk and an ``--out`` that is a file end
in one line naming the path (exit 2), with the earlier checkpoints still readable.

Killed runs are subprocesses of a tiny SFT model that signal themselves at a chosen point (a
real signal from the kernel, at a known step: an outside ``kill`` cannot aim at a step of a
model this small). Their resumes run in this process, against one uninterrupted reference run.
The full disk is real: an 800 KiB tmpfs, filled by the run itself (the tests run as root).
Where ``mount`` is refused the test does not skip: it makes Orbax's save of checkpoint 6 raise
the error TensorStore raises on a full disk, which checks the message and the resume, not the
write path.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign import cli
from jaxalign.checkpoint import Checkpointer
from jaxalign.cli.exits import PREEMPTED_EXIT

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
WORDS = ["apple", "banana", "cherry", "dog", "cat", "sun", "moon", "tree"]
STEPS, SAVE_EVERY = 10, 2

# Runs `jaxalign ARGS` and sends itself a signal: after step K is logged ("log"), or when the
# background save of checkpoint K is about to be renamed into place ("save": files written,
# checkpoint not yet complete).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from jaxalign import cli
    from jaxalign.cli import run_log
    from orbax.checkpoint._src.path import atomicity

    signum, step, where = getattr(signal, sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if where == "log":
        log = run_log.RunLog.log

        def log_then_signal(self, logged, metrics, extra):
            record = log(self, logged, metrics, extra)
            if logged == step:
                os.kill(os.getpid(), signum)
            return record

        run_log.RunLog.log = log_then_signal
    else:
        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def signal_before_rename(self):
            if self.get_final().name == str(step):
                os.kill(os.getpid(), signum)
            await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = signal_before_rename
    sys.exit(cli.main(sys.argv[4:]))
""")


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "1e-2", "--max-length", "32", "--log-every", "1",
            "--save-every", str(SAVE_EVERY), "--no-progress", "--model-overrides",
            json.dumps(TINY), *extra]


def _lines(out: Path) -> list[str]:
    """The complete lines of metrics.jsonl (a torn last line is not one)."""
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    return text.splitlines()[: text.count("\n")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    words = [WORDS[(i * 3) % len(WORDS)] for i in range(24)]
    return _write_jsonl(root / "sft.jsonl",
                        [{"prompt": f"Say {w}:", "completion": f" {w} {w} {w}."} for w in words])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run: its directory and metrics.jsonl lines."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(_flags(data, out)) == 0
    return out, _lines(out)


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    """The environment of killed runs: this one (8 forced host devices, as the reference has)
    plus a shared persistent compilation cache, so that only the first child compiles."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _run_child(env, signame: str, step: int, where: str, flags: list[str]):
    return subprocess.run([sys.executable, "-c", CHILD, signame, str(step), where, *flags],
                          capture_output=True, text=True, timeout=300, env=env)


def _resume(data: Path, out: Path) -> dict:
    assert cli.main(_flags(data, out, "--resume")) == 0
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------ signals
def test_sigterm_checkpoints_the_step_in_flight_exits_143_and_resume_is_exact(
        data, reference, child_env, tmp_path):
    ref_out, ref_lines = reference
    out = tmp_path / "run"
    result = _run_child(child_env, "SIGTERM", 5, "log", _flags(data, out))
    assert result.returncode == PREEMPTED_EXIT == 143, result.stderr[-3000:]
    assert "stopped by SIGTERM after step 5/10; continue with --resume" in result.stderr
    assert "Traceback" not in result.stderr
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4, 5]  # every 2nd, and the step SIGTERM arrived in
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 5
    assert not summary["finished"] and not (out / "final").exists()
    assert _lines(out) == ref_lines[:5]
    resumed = _resume(data, out)
    assert resumed["start_step"] == 5 and resumed["finished"] and resumed["stopped_by"] is None
    assert _lines(out) == ref_lines  # exactly equal floats, each step once
    assert resumed["final_metrics"] == json.loads((ref_out / "summary.json").read_text())[
        "final_metrics"]


@settings(max_examples=3, deadline=None)
@given(step=st.integers(1, STEPS - 1), mid_save=st.booleans())
def test_sigkill_at_any_step_then_resume_loses_nothing(data, reference, child_env,
                                                       tmp_path_factory, step, mid_save):
    _, ref_lines = reference
    out = tmp_path_factory.mktemp("killed") / "run"
    if mid_save:  # killed while checkpoint `step` is being written in the background
        step = max(SAVE_EVERY, step - step % SAVE_EVERY)
    result = _run_child(child_env, "SIGKILL", step, "save" if mid_save else "log",
                        _flags(data, out))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    written = _lines(out)
    assert written == ref_lines[:len(written)] and len(written) >= step
    last_complete = step - SAVE_EVERY if mid_save else step - step % SAVE_EVERY
    with Checkpointer(out / "checkpoints") as ckpt:  # the half-written one is not a checkpoint
        assert ckpt.latest_step() == (last_complete or None)
    resumed = _resume(data, out)
    assert resumed["start_step"] == last_complete and resumed["finished"]
    final = _lines(out)
    assert [json.loads(line)["step"] for line in final] == list(range(1, STEPS + 1))
    assert final == ref_lines and final[:len(written)] == written  # nothing written is lost


# ------------------------------------------------------------------------------ damage
def _largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _overwrite(step_dir: Path) -> None:
    path = _largest_array_file(step_dir)
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 16] = bytes(b ^ 0xFF for b in content[middle:middle + 16])
    path.write_bytes(bytes(content))


def _truncate(step_dir: Path) -> None:
    path = _largest_array_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def _cut_metadata(step_dir: Path) -> None:
    os.truncate(step_dir / "metadata" / "metadata", 7)


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory, data):
    """A run stopped at step 6 with checkpoints 2, 4 and 6."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert cli.main(_flags(data, out, "--stop-at", "6")) == 0
    return out


@pytest.mark.parametrize("damage, cause", [
    (_overwrite, "'[^']+' differs from the fingerprint saved with the checkpoint"),
    (_truncate, r"its arrays cannot be read \(ValueError: OUT_OF_RANGE"),
    (_cut_metadata, r"its metadata cannot be read \(JSONDecodeError"),
])
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(
        data, reference, stopped_at_6, tmp_path, capsys, damage, cause):
    out = tmp_path / "run"
    shutil.copytree(stopped_at_6, out)
    damage(out / "checkpoints" / "6")
    capsys.readouterr()
    resumed = _resume(data, out)
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: checkpoint 6")]
    assert len(warning) == 1, err
    assert re.search(f"checkpoint 6 in {re.escape(str(out / 'checkpoints'))} is damaged: "
                     f"{cause}.*; set aside as 6.corrupt, using step 4 instead", warning[0])
    assert resumed["start_step"] == 4 and resumed["finished"]
    assert _lines(out) == reference[1]
    assert (out / "checkpoints" / "6.corrupt").is_dir()  # kept for inspection


# ------------------------------------------------------------------------------ write errors
def test_out_naming_a_file_is_one_line_exit_2(data, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory\n")
    assert cli.main(_flags(data, target)) == 2
    assert cli.main(_flags(data, target / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"jaxalign sft: error: --out {target} cannot be a run directory: it is a file"
        " (name a directory)",
        f"jaxalign sft: error: --out {target / 'run'} cannot be a run directory: {target} is a"
        " file (name a directory)"]
    assert target.read_text() == "not a directory\n"


@pytest.fixture
def small_disk(tmp_path):
    """An 800 KiB tmpfs (room for two tiny checkpoints and the run's other files), or None
    where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(mount)],
                             capture_output=True, check=False).returncode == 0 if shutil.which(
        "mount") else False
    yield mount if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_exit_2_and_the_earlier_checkpoints_resume(
        data, reference, child_env, small_disk, tmp_path, monkeypatch, capsys):
    if small_disk is not None:  # a real full disk, seen by the real CLI in its own process
        out = small_disk / "run"
        jaxalign = "import sys; from jaxalign import cli; sys.exit(cli.main())"
        result = subprocess.run([sys.executable, "-c", jaxalign, *_flags(data, out)],
                                capture_output=True, text=True, timeout=300, env=child_env)
        code, err = result.returncode, result.stderr
    else:  # no mount: Orbax's save of checkpoint 6 raises what TensorStore raises then
        import orbax.checkpoint as ocp

        out, save = tmp_path / "run", ocp.CheckpointManager.save

        def full_at_6(self, step, *args, **kwargs):
            if step == 6:
                raise ValueError(f"RESOURCE_EXHAUSTED: Error writing local file \"{out}\":"
                                 " No space left on device [os_error_code='28']")
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_6)
        code, err = cli.main(_flags(data, out)), capsys.readouterr().err
        monkeypatch.undo()
    assert code == 2, err[-3000:]
    messages = [line for line in err.splitlines()
                if not line.startswith(("step ", f"{data}:"))]
    assert messages == [f"jaxalign sft: error: {out}/checkpoints/6: No space left on device"
                        " (writing checkpoint 6; checkpoints 2, 4 are intact)"], err[-3000:]
    copy = tmp_path / "copy"  # the earlier checkpoints read back, and the run resumes from 4
    shutil.copytree(out, copy)
    resumed = _resume(data, copy)
    assert resumed["start_step"] == 4 and _lines(copy) == reference[1]
