"""Hugging Face interop checked against ``transformers`` itself (skipped without torch)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the HF parity tests")
transformers = pytest.importorskip(
    "transformers", reason="transformers is needed for the HF parity tests"
)

from jaxalign.models import load_hf, save_hf  # noqa: E402
from jaxalign.sampling import generate  # noqa: E402

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=172, vocab_size=256, max_position_embeddings=128)
EOS = 2


def _hf_model(kind: str, **overrides):
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    config = config_cls(**{**SIZES, "eos_token_id": EOS, "bos_token_id": 1, **overrides})
    model = model_cls(config).eval()
    if kind == "qwen2":  # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def _hf_logits(model, ids, mask=None):
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    kwargs = {}
    if mask is not None:  # HF's plain forward uses arange positions: give ours explicitly
        mask_t = torch.tensor(np.asarray(mask), dtype=torch.long)
        kwargs = dict(attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids_t, **kwargs).logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(model):
    """One jitted forward per (hashable) model: equal configs share the compilation."""
    return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = _hf_model("llama")
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def batch():
    ids = np.random.default_rng(0).integers(3, 256, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_load_hf_logits_match_transformers(tmp_path, batch, kind):
    hf_model = _hf_model(kind, tie_word_embeddings=kind == "qwen2")
    hf_model.save_pretrained(tmp_path)
    model, params = load_hf(tmp_path)
    assert model.config.qkv_bias == (kind == "qwen2")
    assert model.config.tie_embeddings == (kind == "qwen2")
    ids, mask = batch
    forward = _forward(model)
    ours = np.asarray(forward(params, ids, np.ones_like(mask)))
    assert np.abs(ours - _hf_logits(hf_model, ids)).max() <= 1e-4
    ours = np.asarray(forward(params, ids, mask))  # left padding, positions from the mask
    diff = np.abs(ours - _hf_logits(hf_model, ids, mask))[mask == 1]
    assert diff.max() <= 1e-4


def test_greedy_generate_matches_transformers(llama_dir, batch):
    hf_model, path = llama_dir
    model, params = load_hf(path)
    ids, mask = batch
    new = 12
    out = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=new,
                   temperature=0.0, eos_id=EOS, pad_id=0)
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=new, eos_token_id=EOS, pad_token_id=0,
        )[:, ids.shape[1]:].numpy()
    ours = np.asarray(out.tokens)
    assert hf_out.shape[1] >= 1
    np.testing.assert_array_equal(ours[:, :hf_out.shape[1]], hf_out)
    np.testing.assert_array_equal(ours[:, hf_out.shape[1]:], 0)  # HF stopped: all rows ended


def test_save_hf_round_trip(llama_dir, tmp_path, batch):
    hf_model, path = llama_dir
    model, params = load_hf(path)
    save_hf(model, params, tmp_path, extra_config={"eos_token_id": EOS})
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == EOS
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids, mask = batch
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids))
    ours = _forward(model)(params, ids, np.ones_like(mask))
    assert np.abs(np.asarray(ours) - _hf_logits(reloaded, ids)).max() <= 1e-4
    loaded_model, loaded = load_hf(tmp_path)
    assert loaded_model.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_save_hf_qwen2_biases_round_trip(tmp_path, batch):
    hf_model = _hf_model("qwen2", tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path / "original")
    model, params = load_hf(tmp_path / "original", scan_layers=False)
    assert "bias" in params["trunk"]["layers_0"]["attn"]["k_proj"]
    save_hf(model, params, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM" and reloaded.config.tie_word_embeddings
    ids, _ = batch
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids))
    _, loaded = load_hf(tmp_path / "ours", scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_sharded_and_bf16_checkpoints(llama_dir, tmp_path):
    hf_model, path = llama_dir
    _, reference = load_hf(path)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, sharded = load_hf(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded, reference)
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf_model.to(torch.float32)
    model, bf16 = load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert model.config.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16))
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), reference)
    jax.tree.map(np.testing.assert_array_equal, bf16, rounded)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
         "rope_type='llama3'"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_unsupported_checkpoints_raise(tmp_path, overrides, match):
    config = transformers.LlamaConfig(**SIZES, **overrides)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def test_wrong_architecture_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_hf(tmp_path)
