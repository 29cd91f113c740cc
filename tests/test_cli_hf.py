"""Bring your own checkpoint: ``jaxalign sft`` then ``jaxalign dpo`` on a locally saved Hugging
Face model with a chat template and several stop tokens, in bfloat16, each exported with
``--export-hf`` to a checkpoint transformers loads and generates from; and a reward model
exported as ``*ForSequenceClassification`` (what ``jaxalign rm --export-hf`` writes).
"""

import json

import jax
import numpy as np
import pytest

import chat_fixtures as cf
from jaxalign import cli
from jaxalign.cli import run_dir
from jaxalign.models import RewardModel, init_head_from_causal_lm, load_hf
from jaxalign.tokenizer import Tokenizer

torch = pytest.importorskip("torch", reason="torch is needed for the HF round trip")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")

VOCAB = 96  # the fixture tokenizer has ~90 ids
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
BF16 = ("--dtype", "bfloat16", "--param-dtype", "bfloat16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama 3 checkpoint with the Llama 3 chat template; it ends turns with
    <|eot_id|> and text with <|end_of_text|> (generation_config.json lists both)."""
    path = tmp_path_factory.mktemp("llama3")
    tok = cf.backend()
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        rope_scaling=LLAMA3_ROPE, bos_token_id=tok.token_to_id("<|begin_of_text|>"),
        eos_token_id=[eot, end], pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    cf.write_tokenizer(path, "llama3")
    return path, (eot, end)


def _conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"tell me a joke {cf.WORDS[i % 20]} ?"},
            {"role": "assistant", "content": "why the cat sat on the mat ."},
            {"role": "user", "content": "again please"},
            {"role": "assistant", "content": f"the dog ran {cf.WORDS[(i + 3) % 20]} !"}]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(kind, data, out, model, *extra):
    flags = [kind, "--data", str(data), "--out", str(out), "--model", str(model), "--steps",
             "6", "--batch-size", "4", "--lr", "3e-3", "--max-length", "64", "--pad-multiple",
             "32", "--log-every", "1", "--save-every", "1000", "--no-progress", *BF16, *extra]
    assert cli.main(flags) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _hf_generates(path, prompt_ids, stops):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.bfloat16 and model.config.model_type == "llama"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(stops)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=8)
    assert out.shape[1] > len(prompt_ids)
    return model


def test_sft_then_dpo_on_a_hf_checkpoint_in_bf16_export_to_transformers(checkpoint, tmp_path):
    path, stops = checkpoint
    sft = _write(tmp_path / "sft.jsonl", [{"messages": _conversation(i)} for i in range(8)])
    metrics = _run("sft", sft, tmp_path / "sft", path, "--export-hf")
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    exported = tmp_path / "sft" / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = _conversation(0)[:1]
    prompt_ids = list(hf_tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                       tokenize=True)["input_ids"])
    assert prompt_ids == Tokenizer.from_file(path).apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True)
    _hf_generates(exported, prompt_ids, stops)
    prefs = _write(tmp_path / "prefs.jsonl", [
        {"prompt": _conversation(i)[:3], "chosen": [{"role": "assistant", "content": "yes ."}],
         "rejected": [{"role": "assistant", "content": "no no no !"}]} for i in range(8)])
    metrics = _run("dpo", prefs, tmp_path / "dpo", exported, "--export-hf", "--beta", "0.5")
    assert metrics[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-3)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    hf_model = _hf_generates(tmp_path / "dpo" / "hf", prompt_ids, stops)
    model, params = load_hf(tmp_path / "dpo" / "hf", dtype="bfloat16", param_dtype="bfloat16")
    ids = np.asarray([prompt_ids], np.int32)
    ours = np.asarray(model.apply({"params": params}, ids), np.float32)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    assert np.abs(ours - theirs).max() <= 0.1  # bf16 on both sides, in different op orders


def test_a_reward_model_exports_as_sequence_classification(checkpoint, tmp_path):
    """What ``jaxalign rm --export-hf`` writes (``run_dir.save_final``): transformers loads a
    ``LlamaForSequenceClassification`` that scores like the jaxalign reward model."""
    path, _ = checkpoint
    tokenizer = Tokenizer.from_file(path)
    lm, lm_params = load_hf(path)
    model = RewardModel(lm.config)
    params = init_head_from_causal_lm(model, lm_params, jax.random.key(0))
    run_dir.save_final(tmp_path, "rm", model, params, tokenizer, 1, True)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "LlamaForSequenceClassification"
    assert reloaded.config.pad_token_id == tokenizer.pad_id
    ids = np.asarray([tokenizer.apply_chat_template(_conversation(1), tokenize=True)], np.int32)
    ours = np.asarray(model.apply({"params": params}, ids))
    with torch.no_grad():
        theirs = reloaded(torch.tensor(ids, dtype=torch.long)).logits[:, 0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_precision_and_remat_flags_reach_the_model_config():
    _, config = cli.parse_args(["sft", "--dtype", "bfloat16", "--param-dtype", "bfloat16",
                                "--remat", "full", "--model-overrides", '{"max_len": 48}'])
    assert config.compute.overrides() == {"dtype": "bfloat16", "param_dtype": "bfloat16",
                                          "remat": True, "remat_policy": "nothing"}
    _, config = cli.parse_args(["ppo", "--remat", "dots"])
    assert config.compute.overrides() == {"remat": True, "remat_policy": "dots"}
    _, config = cli.parse_args(["dpo", "--remat", "none"])
    assert config.compute.overrides() == {"remat": False}
    assert cli.parse_args(["rm"])[1].compute.overrides() == {}  # the model's own settings
