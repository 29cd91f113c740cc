"""LoRA adapters against PEFT itself (skipped without torch / transformers / peft).

A tiny random Qwen2 (q/k/v biases, so the projections' bias handling is exercised) is saved by
transformers, loaded into jaxalign, given trained-looking adapters (``B`` non-zero), exported as
a PEFT adapter and loaded with ``peft.PeftModel.from_pretrained``; the logits must agree, and
so must the merged Hugging Face export loaded by transformers alone.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the PEFT parity tests")
transformers = pytest.importorskip("transformers", reason="transformers is needed")
peft = pytest.importorskip("peft", reason="peft is needed for the PEFT parity tests")

from jaxalign.models import load_hf, lora  # noqa: E402
from jaxalign.models.lora_peft import (  # noqa: E402
    load_peft_adapter, save_merged_hf, save_peft_adapter,
)

from lora_fixtures import perturb_b  # noqa: E402

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=128, max_position_embeddings=64,
             initializer_range=0.15)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**SIZES)
    config._attn_implementation = "eager"
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("qwen2")
    hf_model.save_pretrained(path)
    model, params = load_hf(path)
    return hf_model, path, model, params


def _trained(model, params, targets="all-linear"):
    lora_model = lora.with_lora(model, 4, alpha=12.0, targets=targets)
    params = lora.init_lora(lora_model, params, jax.random.key(0))
    return lora_model, perturb_b(params, scale=0.1, seed=1)


def _ids():
    return np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_peft_loads_the_exported_adapter_and_it_reads_back(base, tmp_path):
    hf_model, hf_path, model, params = base
    lora_model, trained = _trained(model, params, targets="q,k,o,up,down")
    save_peft_adapter(lora_model, trained, tmp_path / "adapter", base_model_name_or_path="qwen2")
    spec = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert spec["r"] == 4 and spec["lora_alpha"] == 12.0
    assert spec["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj"]
    fresh = transformers.AutoModelForCausalLM.from_pretrained(hf_path).eval()
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ids = _ids()
    ours = np.asarray(jax.jit(lambda p: lora_model.apply({"params": p}, ids))(trained))
    base_gap = np.abs(ours - _hf_logits(hf_model, ids)).max()
    assert base_gap > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, _hf_logits(peft_model, ids), atol=1e-4, rtol=0)
    loaded_model, loaded = load_peft_adapter(model, params, tmp_path / "adapter")
    assert loaded_model.config == lora_model.config
    assert jax.tree.structure(loaded) == jax.tree.structure(trained)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)


def test_merged_export_matches_transformers_and_bad_adapters_are_named(base, tmp_path):
    _, _, model, params = base
    lora_model, trained = _trained(model, params)
    save_merged_hf(lora_model, trained, tmp_path / "merged")
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = _ids()
    ours = np.asarray(jax.jit(lambda p: lora_model.apply({"params": p}, ids))(trained))
    np.testing.assert_allclose(ours, _hf_logits(merged_hf, ids), atol=1e-4, rtol=0)
    save_peft_adapter(lora_model, trained, tmp_path / "adapter")
    spec_path = tmp_path / "adapter" / "adapter_config.json"
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA adapters"):
        load_peft_adapter(model, params, tmp_path / "adapter")
    spec_path.write_text(json.dumps({**spec, "r": 8}))
    with pytest.raises(ValueError, match=r"lora_A.weight should be \(8, 64\), got \(4, 64\)"):
        load_peft_adapter(model, params, tmp_path / "adapter")
    with pytest.raises(ValueError, match="needs a LoRA model"):
        save_peft_adapter(model, params, tmp_path / "none")
    assert jnp.all(jnp.isfinite(ours))
