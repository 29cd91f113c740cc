"""``--lora-rank`` / ``--lora-adapter`` / ``--export-adapter`` on the training commands and ppo.

A LoRA DPO run starts at ln 2 (B = 0: the policy is its reference), its loss falls, its merged
``--export-hf`` checkpoint computes what the LoRA model computes, and its PEFT adapter starts a
second run where the first left off; a LoRA PPO run trains adapters against a reference that is
the same tree with the adapters off.
"""

import json
import math

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.cli import run_dir
from jaxalign.models import load_hf, lora
from test_cli import TINY, _flags, _metrics, data  # noqa: F401  (fixture)

LORA = ("--lora-rank", "4", "--lora-targets", "q,v,o,up,down")


@pytest.fixture(scope="module")
def lora_dpo(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dpo")
    assert cli.main(_flags("dpo", data["pref"], out, *LORA, "--lora-dropout", "0.05",
                           "--export-hf", "--export-adapter")) == 0
    return out


def test_lora_dpo_learns_and_exports_merged_and_peft(lora_dpo):
    losses = [m["loss"] for m in _metrics(lora_dpo)]
    assert losses[0] == pytest.approx(math.log(2.0), abs=1e-6)
    assert losses[-1] < losses[0] - 0.02
    model, params, _ = run_dir.load_final(lora_dpo)
    assert model.config.lora_rank == 4 and model.config.lora_scale == 2.0
    assert set(lora.adapter_params(params)["trunk"]["layers_0"]["attn"]) == {"q_proj", "v_proj",
                                                                           "o_proj"}
    hf_model, hf_params = load_hf(lora_dpo / "hf")
    assert not lora.is_lora(hf_model)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16))
    ours = jax.jit(lambda p: model.apply({"params": p}, ids))(params)
    merged = jax.jit(lambda p: hf_model.apply({"params": p}, ids))(hf_params)
    np.testing.assert_allclose(merged, ours, atol=1e-5)
    spec = json.loads((lora_dpo / "adapter" / "adapter_config.json").read_text())
    assert (spec["r"], spec["lora_alpha"], spec["lora_dropout"]) == (4, 8.0, 0.05)
    assert model.config.lora_dropout == 0.05  # the run trained with it
    assert spec["target_modules"] == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_adapter_continues_where_the_run_left_off(lora_dpo, data, tmp_path):
    out = tmp_path / "again"
    assert cli.main(_flags("dpo", data["pref"], out, "--lora-adapter",
                           str(lora_dpo / "adapter"), "--steps", "1")) == 0
    first = _metrics(out)[0]["loss"]
    assert first < math.log(2.0) - 0.02  # the adapter's preference, not a fresh B = 0
    model, params, _ = run_dir.load_final(out)
    assert model.config.lora_targets == ("q", "v", "o", "up", "down")


def test_lora_ppo_trains_adapters_against_the_base_model(tmp_path, lora_dpo):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}:"}) + "\n"
                               for w in ("dog", "cat", "sun", "moon")))
    out = tmp_path / "ppo"
    flags = ["ppo", "--prompts", str(prompts), "--policy", "tiny", "--tokenizer",
             str(lora_dpo / "tokenizer"), "--model-overrides", json.dumps(TINY), "--out",
             str(out), "--steps", "3", "--batch-size", "4", "--max-new-tokens", "8",
             "--reward-fn", "jaxalign.rewards:length_penalty(coef=0.1)", "--lr", "3e-3",
             "--save-every", "1000", "--no-progress", *LORA, "--export-adapter"]
    assert cli.main(flags) == 0
    metrics = _metrics(out)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: policy == reference
    assert abs(metrics[-1]["kl"]) > 1e-5  # the adapters moved away from the base model
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (("--export-adapter",), "--export-adapter writes LoRA adapters"),
    (("--lora-rank", "4", "--lora-targets", "q,lm_head"), "choose from q, k, v"),
    (("--lora-rank", "4", "--ref-sync-every", "2"), "LoRA run's reference is the base model"),
])
def test_bad_lora_options_exit_2_naming_them(data, tmp_path, capsys, extra, message):
    assert cli.main(_flags("dpo", data["pref"], tmp_path / "bad", *extra)) == 2
    assert message in capsys.readouterr().err


def test_rm_export_adapter_is_refused_before_training(data, tmp_path, capsys):
    """PEFT's format has no score head: refused up front, not after the last step."""
    out = tmp_path / "rm"
    assert cli.main(_flags("rm", data["pref"], out, "--lora-rank", "4", "--export-adapter")) == 2
    assert "has no RewardModel" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
