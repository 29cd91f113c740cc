"""Hugging Face interop checked against ``transformers`` itself (skipped without torch).

Every family is a tiny random model built by transformers (hidden 64, vocab 128, one layer, or
two where layers differ: Gemma's sliding and global ones; weights drawn with std 0.15 and norm
weights perturbed, so logits are O(5) and a wrong switch moves them by O(1)), saved by the
test to a temporary directory.
"""

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

from jaxalign import sharding  # noqa: E402
from jaxalign.models import (  # noqa: E402
    CausalLM, RewardModel, TransformerConfig, load_hf, save_hf,
)
from jaxalign.sampling import generate  # noqa: E402

T = transformers
SIZES = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=128, max_position_embeddings=64,
             initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 12  # shorter than the test sequences (40 tokens; 20 + 24 when generating)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama3": (T.LlamaConfig, dict(rope_scaling=LLAMA3_ROPE, attention_bias=True,
                                   mlp_bias=True)),
    "mistral": (T.MistralConfig, dict(sliding_window=WINDOW)),
    "qwen2": (T.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (T.Qwen3Config, dict(head_dim=32)),
    "gemma2": (T.Gemma2Config, dict(head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                    num_hidden_layers=2)),
    "gemma3": (T.Gemma3TextConfig, dict(head_dim=32, sliding_window=WINDOW, num_hidden_layers=2,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "phi3": (T.Phi3Config, dict(sliding_window=WINDOW, partial_rotary_factor=0.5)),
}
MODEL_TYPES = {"llama3": "llama", "gemma3": "gemma3_text"}


def _hf_model(config_cls, model_cls=T.AutoModelForCausalLM, **overrides):
    torch.manual_seed(0)
    config = config_cls(**{**SIZES, **overrides})
    config._attn_implementation = "eager"  # transformers' reference attention
    model = model_cls.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 (or 0) and biases at 0: make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
            elif name.endswith("bias"):
                param.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``name -> (transformers model, saved directory)``, built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            config_cls, overrides = FAMILIES[name]
            model = _hf_model(config_cls, **overrides)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def batch():
    """``[3, 40]`` ids with rows 1 and 2 left-padded (5 and 17 pads)."""
    ids = np.random.default_rng(0).integers(3, 128, (3, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = mask[2, :17] = 0
    ids[mask == 0] = 0
    return ids, mask


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


def _max_logit_diff(model, params, hf_model, ids, mask):
    """``(unpadded, left-padded)`` max |logit difference| over real tokens."""
    forward = _forward(model)
    full = np.abs(np.asarray(forward(params, ids, np.ones_like(mask))) - _hf_logits(hf_model, ids))
    padded = np.abs(np.asarray(forward(params, ids, mask)) - _hf_logits(hf_model, ids, mask))
    return float(full.max()), float(padded[mask == 1].max())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_logits_generation_and_export_match_transformers(checkpoints, batch, tmp_path,
                                                                name):
    hf_model, path = checkpoints(name)
    model, params = load_hf(path)
    assert model.config.family == MODEL_TYPES.get(name, name)
    ids, mask = batch
    assert max(_max_logit_diff(model, params, hf_model, ids, mask)) <= 1e-4
    # greedy decoding through the KV cache (and the sliding window) gives transformers' tokens
    prompt_ids, prompt_mask = ids[:, 20:], mask[:, 20:]
    out = generate(model, params, prompt_ids, prompt_mask, jax.random.key(0),
                   max_new_tokens=24, temperature=0.0, eos_id=(2, 5), pad_id=0)
    with torch.no_grad():
        expected = hf_model.generate(
            input_ids=torch.tensor(prompt_ids, dtype=torch.long),
            attention_mask=torch.tensor(prompt_mask, dtype=torch.long), do_sample=False,
            max_new_tokens=24, eos_token_id=[2, 5], pad_token_id=0,
        )[:, prompt_ids.shape[1]:].numpy()
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)
    # export: the same family, sharded, that transformers loads to the same logits
    save_hf(model, params, tmp_path, extra_config={"eos_token_id": 2, "pad_token_id": 0},
            max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    assert reloaded.config.model_type == hf_model.config.model_type
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids))
    loaded_model, loaded = load_hf(tmp_path)
    assert loaded_model.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "linear", "factor": 3.0}])
def test_rope_scalings_match_transformers(batch, rope, tmp_path):
    """Dynamic NTK scaling (sequences past max_position_embeddings=32) and linear scaling."""
    hf_model = _hf_model(T.LlamaConfig, rope_scaling=rope, max_position_embeddings=32)
    hf_model.save_pretrained(tmp_path)
    model, params = load_hf(tmp_path)
    assert model.config.rope_type == rope["rope_type"]
    ids, mask = batch
    assert max(_max_logit_diff(model, params, hf_model, ids, mask)) <= 1e-4


def test_sequence_classification_round_trips_as_a_reward_model(tmp_path):
    hf_model = _hf_model(T.LlamaConfig, T.AutoModelForSequenceClassification, num_labels=1,
                         num_hidden_layers=2)
    hf_model.save_pretrained(tmp_path / "hf")
    model, params = load_hf(tmp_path / "hf")
    assert isinstance(model, RewardModel) and float(params["score_head"]["bias"]) == 0.0
    ids = np.random.default_rng(1).integers(3, 128, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = mask[2, 4:] = 0
    ids[mask == 0] = 0  # right padding with pad_token_id: HF scores the last non-pad token
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    save_hf(model, params, tmp_path / "ours", extra_config={"pad_token_id": 0})
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "ours", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        again = reloaded(torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_array_equal(again, theirs)
    shifted = {**params, "score_head": {**params["score_head"], "bias": jnp.float32(0.5)}}
    with pytest.raises(ValueError, match="score_head.bias=0.5"):
        save_hf(model, shifted, tmp_path / "shifted")


def test_sharded_bf16_checkpoints_and_param_dtype(checkpoints, tmp_path):
    hf_model, path = checkpoints("qwen3")
    _, reference = load_hf(path)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, sharded = load_hf(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded, reference)
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), reference)
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf_model.to(torch.float32)
    model, bf16 = load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)  # bf16 file -> float32 params
    assert model.config.dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.float32)), bf16,
                 rounded)
    model, direct = load_hf(path, param_dtype=jnp.bfloat16)  # float32 file -> bf16 params
    assert {leaf.dtype for leaf in jax.tree.leaves(direct)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(np.testing.assert_array_equal, direct, rounded)


def test_load_hf_places_each_shard_on_its_device(checkpoints, batch):
    hf_model, path = checkpoints("mistral")
    model, reference = load_hf(path)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model, params = load_hf(path, mesh=mesh, rules=sharding.DEFAULT_RULES)
    expected = sharding.param_shardings(model, reference, mesh)
    jax.tree.map(lambda leaf, want: leaf.sharding.is_equivalent_to(want, leaf.ndim) or
                 pytest.fail(f"{leaf.sharding} != {want}"), params, expected)
    kernel = params["trunk"]["layers_0"]["mlp"]["up_proj"]["kernel"]  # [64 embed, 128 mlp]
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(32, 64)}
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    _, scanned = load_hf(path, mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True)
    assert scanned["trunk"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (1, 64, 128)
    with pytest.raises(ValueError, match="needs rules"):
        load_hf(path, mesh=mesh)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
         "rope_parameters.rope_type='yarn' is not supported"),
        (dict(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0],
                                               "long_factor": [1.0]}, rope_parameters=None),
         "rope_scaling.rope_type='longrope'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                               "mrope_section": [2, 2]}), "mrope_section"),
        (dict(hidden_act="relu"), "hidden_act='relu'"),
        (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
        (dict(model_type="gemma3"), "vision-language"),
        (dict(model_type="gemma3_text", use_bidirectional_attention=True),
         "use_bidirectional_attention=True"),
        (dict(model_type="qwen2", mlp_bias=True), "mlp_bias=True is not supported"),
    ],
)
def test_unsupported_checkpoints_name_the_key(tmp_path, changes, match):
    config = T.LlamaConfig(**SIZES).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def test_missing_misshapen_and_unexpressible_weights_raise(checkpoints, tmp_path):
    hf_model, path = checkpoints("qwen3")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match="the config implies"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="weights this model does not use"):
        load_hf(tmp_path)
    model = CausalLM(TransformerConfig(vocab_size=32, qk_norm=True, family="llama"))
    with pytest.raises(ValueError, match="model_type='llama' cannot express qk_norm=True"):
        save_hf(model, {}, tmp_path / "out")  # refused before any weight is read
