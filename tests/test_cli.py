"""The `jaxalign` command line and its Python API: every command learns, resumes exactly,
refuses bad data and mismatched checkpoints with messages that name the problem.

Training runs are shared through module-scoped fixtures (each compile costs seconds on CPU):
one run per command, plus an interrupted-and-resumed IPO run compared with the uninterrupted one.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.cli import run_dir
from jaxalign.cli import train as runner
from jaxalign.models import load_hf, save_hf
from jaxalign.tokenizer import Tokenizer

# Smaller than the tiny preset: one layer, width 32 (the vocabulary comes from the tokenizer).
TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
WORDS = ["apple", "banana", "cherry", "dog", "cat", "sun", "moon", "tree"]
STEPS = {"sft": 16, "rm": 16, "dpo": 16, "ipo": 12, "orpo": 16, "kto": 16}
LEARNING_RATES = {"sft": "1e-2", "rm": "3e-3", "dpo": "3e-3", "ipo": "3e-3", "orpo": "1e-2",
                  "kto": "3e-3"}
KIND_FLAGS = {"ipo": ("--beta", "1.0")}  # IPO's target margin 1/(2β) = 0.5, loss starts at 0.25
RESUME_AT = 6  # the IPO run is also interrupted here and resumed


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _sft_records(n=24):
    return [{"prompt": f"Say {w}:", "completion": f" {w} {w} {w}."}
            for w in (WORDS[(i * 3) % len(WORDS)] for i in range(n))]


def _pref_records(n=24):
    # chosen always starts "yes" and is short, rejected "no ... bad bad": easy to learn
    return [{"prompt": f"Say {w}:", "chosen": f" yes {w} good", "rejected": f" no {w} bad bad"}
            for w in (WORDS[(i * 5) % len(WORDS)] for i in range(n))]


def _flags(kind, data, out, *extra):
    """Command-line arguments of a small run; later flags (in `extra`) win over earlier ones."""
    return [kind, "--data", str(data), "--out", str(out), "--steps", str(STEPS[kind]),
            "--batch-size", "4", "--lr", LEARNING_RATES[kind], "--max-length", "32",
            "--log-every", "1", "--save-every", "1000", "--no-progress", *KIND_FLAGS.get(kind, ()),
            *(["--model-overrides", json.dumps(TINY)] if "--init-from" not in extra else []),
            *extra]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    sft = _write_jsonl(root / "sft.jsonl", _sft_records())
    pref_records = _pref_records()
    pref = _write_jsonl(root / "pref.jsonl", pref_records)
    # one bad record (line 4: no 'rejected') for the --on-bad-record tests
    bad_records = list(pref_records)
    bad_records.insert(3, {"prompt": "Say dog:", "chosen": " yes dog good"})
    bad = _write_jsonl(root / "pref_bad.jsonl", bad_records)
    unpaired = _write_jsonl(root / "unpaired.jsonl", [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in pref_records for side in ("chosen", "rejected")])
    return {"sft": sft, "pref": pref, "bad": bad, "unpaired": unpaired}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """`runs(kind)` trains `kind` once per module; `.out`, `.err`, `.stdout`, `.summary`.

    rm starts from the SFT run and skips a bad record; dpo precomputes reference log-probs;
    orpo goes through the Python API (`run_training`) instead of `main`.
    """
    done = {}

    def get(kind):
        if kind not in done:
            out = tmp_path_factory.mktemp(f"run_{kind}")
            data_file, extra = data["pref"], ()
            if kind == "sft":
                data_file = data["sft"]
            elif kind == "rm":  # also shows the progress bar
                data_file, extra = data["bad"], ("--on-bad-record", "skip", "--progress",
                                                  "--init-from", str(get("sft").out))
            elif kind == "dpo":
                extra = ("--precompute-ref",)
            elif kind == "kto":
                data_file = data["unpaired"]
            with pytest.MonkeyPatch.context() as mp:
                tee, stdout = _Tee(sys.stderr), _Tee(sys.stdout)
                mp.setattr(sys, "stderr", tee)
                mp.setattr(sys, "stdout", stdout)
                if kind == "orpo":
                    summary = cli.run_training("orpo", {
                        "data": data_file, "out": out, "steps": STEPS[kind],  # paths ok
                        "batch_size": 4, "lr": float(LEARNING_RATES[kind]), "max_length": 32,
                        "log_every": 1, "save_every": 1000, "progress": False,
                        "model_overrides": TINY})
                else:
                    assert cli.main(_flags(kind, data_file, out, *extra)) == 0, tee.text
                    summary = json.loads((out / "summary.json").read_text())
            done[kind] = SimpleNamespace(out=out, err=tee.text, stdout=stdout.text,
                                         summary=summary)
        return done[kind]

    return get


class _Tee:
    """Keeps a copy of what a module-scoped run writes to stderr (capsys is per test)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    @property
    def text(self):
        return "".join(self.parts)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", ["sft", "rm", "dpo", "ipo", "orpo", "kto"])
def test_each_command_trains_and_its_loss_falls(runs, kind):
    run = runs(kind)
    out = run.out
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS[kind] + 1))
    losses = [m["loss"] for m in metrics]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (kind, losses)
    if kind in ("dpo", "ipo"):  # the policy starts at the reference: DPO ln 2, IPO (1/2β)²
        assert losses[0] == pytest.approx(np.log(2.0) if kind == "dpo" else 0.25, rel=1e-4)
        assert metrics[-1]["rewards/accuracies"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS[kind] and summary["finished"]
    line = (f"jaxalign {kind}: {STEPS[kind]} steps (to step {STEPS[kind]}/{STEPS[kind]}),"
            f" final loss {losses[-1]:.4f}, ")
    assert line in run.stdout and f"tokens/s -> {out / 'final'}" in run.stdout
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert (out / "checkpoints" / str(STEPS[kind])).is_dir()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    info = json.loads((out / "final" / "config.json").read_text())
    assert info["model_type"] == ("reward_model" if kind == "rm" else "causal_lm")
    assert info["model_config"]["d_model"] == 32


def test_final_model_round_trips_and_init_from_reuses_the_trunk(runs, data, tmp_path):
    sft_out = runs("sft").out
    assert (sft_out / "tokenizer" / "tokenizer.json").is_file()  # trained on the data file
    model, params, info = run_dir.load_final(sft_out)
    tokenizer = Tokenizer.from_file(sft_out / "final" / "tokenizer")
    assert model.config.vocab_size == tokenizer.vocab_size == info["model_config"]["vocab_size"]
    config = cli.make_config({"data": str(data["pref"]), "out": str(tmp_path),
                              "init_from": str(sft_out)})
    rm_model, rm_params = runner.initial_model("rm", config, tokenizer, jax.random.key(0))
    assert type(rm_model).__name__ == "RewardModel" and "score_head" in rm_params
    jax.tree.map(np.testing.assert_array_equal, rm_params["trunk"], params["trunk"])
    # and the rm run started from it: its config is the SFT run's, its loss fell (see above)
    assert run_dir.load_final(runs("rm").out)[0].config == model.config


def test_skip_prints_the_report_and_the_bar_shows_loss_and_tokens_per_s(runs, data):
    err = runs("rm").err
    assert "jaxalign rm: 100%" in err and f"{STEPS['rm']}/{STEPS['rm']}" in err
    assert "loss=" in err and "tok_s=" in err
    assert f"{data['bad']}: 24 preference records, 0 truncated, 1 skipped" in err
    assert f"skipped {data['bad']}:4: missing field 'rejected'" in err


def test_run_training_python_api_returns_the_summary(runs):
    run = runs("orpo")  # trained with cli.run_training, not main
    out, summary = run.out, run.summary
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "orpo" and summary["start_step"] == 0
    assert summary["final_dir"] == str(out / "final") and summary["hf_dir"] is None
    assert set(summary["final_metrics"]) >= {"loss", "nll", "log_odds_ratio", "grad_norm"}
    with pytest.raises(cli.ConfigError, match="unknown config key 'epochs'"):
        cli.run_training("orpo", {"data": "x", "out": "y", "epochs": 2})
    with pytest.raises(cli.ConfigError, match="unknown command 'xpo'"):
        cli.run_training("xpo", {})


# ------------------------------------------------------------------------------ HF interop
def _hf_implemented(tmp_path, model, params):
    try:
        save_hf(model, params, tmp_path / "probe")
    except NotImplementedError:
        return False
    return True


def test_hf_model_dir_in_and_export_hf_out(runs, data, tmp_path):
    sft_out = runs("sft").out
    model, params, _ = run_dir.load_final(sft_out)
    if not _hf_implemented(tmp_path, model, params):
        pytest.skip("jaxalign.models.save_hf/load_hf are not implemented yet")
    hf_in = tmp_path / "hf_in"
    save_hf(model, params, hf_in)
    Tokenizer.from_file(sft_out / "final" / "tokenizer").save(hf_in)
    out = tmp_path / "from_hf"
    # the DPO run's options, so that the compiled step is reused if the configs round-trip
    flags = _flags("dpo", data["pref"], out, "--model", str(hf_in), "--export-hf",
                   "--precompute-ref")
    flags.remove("--model-overrides")
    flags.remove(json.dumps(TINY))
    assert cli.main(flags) == 0
    assert _metrics(out)[0]["loss"] == pytest.approx(np.log(2.0), rel=1e-4)
    exported_model, exported = load_hf(out / "hf")
    _, final_params, _ = run_dir.load_final(out)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), exported, final_params)
    assert (out / "hf" / "tokenizer.json").is_file()
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == Tokenizer.from_file(out / "hf").eos_id


# ------------------------------------------------------------------------------ resume
def test_resume_gives_the_uninterrupted_metrics(runs, data, tmp_path):
    full = runs("ipo").out
    out = tmp_path / "resumed"
    assert cli.main(_flags("ipo", data["pref"], out, "--stop-at", str(RESUME_AT))) == 0
    assert _metrics(out) == _metrics(full)[:RESUME_AT]
    assert sorted(os.listdir(out / "checkpoints")) == [str(RESUME_AT)]
    assert not (out / "final").exists()
    # a crash after the checkpoint would have logged more lines: the resumed run drops them
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": RESUME_AT + 1, "loss": -1.0}) + "\n")
    runner._training_fns.cache_clear()  # compile afresh, as a new process would
    assert cli.main(_flags("ipo", data["pref"], out, "--resume")) == 0
    resumed, uninterrupted = _metrics(out), _metrics(full)
    assert len(resumed) == len(uninterrupted) == STEPS["ipo"]
    for mine, theirs in zip(resumed, uninterrupted):
        assert mine == theirs  # exactly equal floats, line by line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == RESUME_AT and summary["finished"]


def test_resume_into_a_different_model_config_names_the_field(runs, data, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(runs("ipo").out, out)
    flags = _flags("ipo", data["pref"], out, "--resume")
    flags[flags.index("--model-overrides") + 1] = json.dumps({**TINY, "d_model": 48})
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert "checkpoint was written with d_model=32 but the model has d_model=48" in err


def test_existing_checkpoints_without_resume_are_refused(runs, data, capsys):
    out = runs("orpo").out
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(_flags("orpo", data["pref"], out)) == 2
    assert "already holds checkpoints (latest step 16); pass --resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------------------ bad input
def test_bad_record_exits_2_with_file_line_reason_and_trains_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_flags("dpo", data["bad"], out)) == 2
    err = capsys.readouterr().err
    assert f"{data['bad']}:4: missing field 'rejected'" in err.splitlines()
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not out.exists() or not any(out.iterdir())


def test_invalid_json_line_is_reported_with_its_line(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "sft.jsonl", _sft_records(6)[:2] + ['{"prompt": "x", '])
    assert cli.main(_flags("sft", path, tmp_path / "run")) == 2
    assert f"{path}:3: invalid JSON" in capsys.readouterr().err


def test_wrong_record_kind_and_unknown_preset_are_errors(data, tmp_path, capsys):
    assert cli.main(_flags("sft", data["pref"], tmp_path / "a")) == 2
    assert f"{data['pref']}:1: missing field 'completion'" in capsys.readouterr().err
    assert cli.main(_flags("sft", data["sft"], tmp_path / "b", "--model", "huge")) == 2
    assert "--model 'huge' is neither a preset (tiny, small, bench)" in capsys.readouterr().err
    assert cli.main(_flags("sft", data["sft"], tmp_path / "d", "--batch-size", "64")) == 2
    assert "batch_size=64 does not fit a dataset of 24 examples" in capsys.readouterr().err
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "d"))


# ------------------------------------------------------------------------------ options
def test_kto_command_trains_bco_with_its_running_baseline(data, tmp_path):
    """``jaxalign kto --loss bco`` runs (its baseline is arrays in the state) and reports the
    baseline's shift."""
    out = tmp_path / "bco"
    assert cli.main(_flags("kto", data["unpaired"], out, "--loss", "bco", "--steps", "6")) == 0
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert metrics[0]["bco/delta"] == pytest.approx(0.0, abs=1e-6)  # π = ref at step 1
    assert metrics[-1]["bco/delta"] != 0.0 and metrics[-1]["loss"] < metrics[0]["loss"]


def test_loss_combinations_and_their_weights_from_flags_and_files(tmp_path, data, capsys):
    _, config = cli.parse_args(["dpo", "--loss", "hinge,sft", "--loss-weights", "1,0.5",
                                "--ref-sync-every", "4"])
    assert config.preference.loss == ("hinge", "sft")
    assert config.preference.loss_weights == (1.0, 0.5)
    assert config.preference_config("dpo").ref_sync_every == 4
    # ipo / orpo / kto are dpo with their own default loss; an explicit --loss wins
    assert cli.make_config({}, command="ipo").preference_config("ipo").loss == ("ipo",)
    assert cli.make_config({"loss": "simpo"}).preference_config("orpo").loss == ("simpo",)
    assert cli.make_config({"loss": ["dpo", "sft"]}).preference.loss == ("dpo", "sft")
    with pytest.raises(SystemExit):
        cli.parse_args(["dpo", "--loss", "dpo,bogus"])
    assert "option 'loss' must be one of" in capsys.readouterr().err
    with pytest.raises(cli.ConfigError, match="loss_weights has 1 entries for 2 losses"):
        cli.make_config({"loss": "dpo,sft", "loss_weights": [1.0]})
    with pytest.raises(cli.ConfigError, match="precompute_ref fixes the reference"):
        cli.make_config({"precompute_ref": True, "ref_sync_every": 2})
    out = tmp_path / "combo"
    assert cli.main(_flags("dpo", data["pref"], out, "--loss", "dpo,sft", "--loss-weights",
                           "1,0.5", "--steps", "6")) == 0
    metrics = _metrics(out)
    assert all(m["loss"] == pytest.approx(m["loss/dpo"] + 0.5 * m["loss/sft"], rel=1e-5)
               for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_config_file_is_merged_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: d.jsonl\nout: runs/x\nsteps: 7\nlr: 1e-3\nbeta: 0.5\n"
                    "precompute-ref: true\nmodel_overrides: {n_layers: 1}\n")
    kind, config = cli.parse_args(["dpo", "--config", str(path), "--steps", "3",
                                   "--no-precompute-ref"])
    assert kind == "dpo"
    assert config.steps == 3 and config.precompute_ref is False  # flags win
    assert config.lr == 1e-3 and config.preference.beta == 0.5 and config.data == "d.jsonl"  # file
    assert config.model_overrides == {"n_layers": 1} and config.batch_size == 8  # file, default
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"steps": 5, "seed": 3}))
    _, config = cli.parse_args(["sft", "--config", str(json_path), "--seed", "4"])
    assert (config.steps, config.seed) == (5, 4)


@pytest.mark.parametrize("text, message", [
    ("steps: 3\nlearning_rate: 0.1\n", "unknown config key 'learning_rate'"),
    ("steps: three\n", "config key 'steps' must be an integer, got 'three'"),
    ("- steps\n", "must hold a mapping"),
    ("on_bad_record: ignore\n", "config key 'on_bad_record' must be one of"),
])
def test_bad_config_file_names_the_key(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["sft", "--config", str(path), "--data", "x", "--out", "y"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(cli.ConfigError, match="unknown config key 'bogus'"):
        cli.make_config({"bogus": 1})


def test_config_file_is_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("steps: !!python/object/apply:os.system ['touch pwned']\n")
    assert cli.main(["sft", "--config", str(path)]) == 2
    assert "could not determine a constructor" in capsys.readouterr().err
    assert not Path("pwned").exists()


def test_help_documents_every_option_with_its_default(capsys):
    for kind in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([kind, "--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
        for field in dataclasses.fields(cli.config_class(kind)):
            embedded = field.metadata.get("embed")  # a library config: its fields are options
            commands = field.metadata["commands"]
            if embedded is not None and (commands is None or kind in commands):
                names = [f.name for f in dataclasses.fields(embedded)
                         if f.name not in field.metadata["exclude"]]
            elif embedded is None and (commands is None or kind in commands):
                names = [field.name]
            else:
                names = []
            for name in names:
                if field.metadata.get("positional"):  # jaxalign plan STEP
                    assert f"positional arguments: {{{','.join(field.metadata['choices'])}}}" \
                        in text, (kind, name)
                    continue
                assert "--" + name.replace("_", "-") + " " in text, (kind, name)
        if kind in cli.COMMANDS and kind != "label":
            assert "--warmup-steps N linear warmup updates" in text  # OptimizerConfig's help
        if kind == "ppo":  # RLHFConfig's fields, help and defaults
            assert "--gae-lambda X GAE lambda (default: 0.95)" in text
            assert "none: beta stays fixed (default: None)" in text
            assert "--kl-estimator {k1,k2,k3,abs}" in text and "--eos-id" not in text
        assert "--config FILE.yaml" in text
        if kind in (*cli.TRAIN_COMMANDS, "ppo"):
            assert "--steps N" in text and "(default: 100)" in text
        assert ("--beta" in text) == (kind in ("dpo", "ipo", "orpo", "kto"))
        assert ("--loss-weights X,X" in text) == (kind in ("dpo", "ipo", "orpo", "kto"))
        assert ("--precompute-ref" in text) == (kind in ("dpo", "ipo", "plan"))
        assert ("--include-prompt" in text) == (kind == "sft")


def test_installed_console_script_help():
    script = Path(sys.executable).parent / "jaxalign"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in cli.COMMANDS:
        assert command in result.stdout


def test_argparse_rejects_a_bad_flag_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--steps", "many"])
    assert exit_info.value.code == 2
    assert "argument --steps: invalid int value: 'many'" in capsys.readouterr().err
