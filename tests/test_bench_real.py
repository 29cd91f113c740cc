"""benchmarks/bench_real.py's data and its PyTorch baseline: the length distribution the issue
specifies, the real-token count both sides report, and the two PyTorch heads computing the
same log-probs (so the fused row is the same work, not a different loss)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench_real = _load("bench_real")


def test_length_distribution_is_seeded_capped_and_centred():
    batches = bench_real.sample_pairs(100, 32768, seed=3)
    assert len(batches) == 100 and all(len(b) == bench_real.PAIRS for b in batches)
    again = bench_real.sample_pairs(100, 32768, seed=3)
    assert all(np.array_equal(x, y) for b, c in zip(batches, again) for p, q in zip(b, c)
               for x, y in zip(p, q))
    pairs = [pair for batch in batches for pair in batch]
    prompts = np.array([len(p) for p, _, _ in pairs])
    completions = np.array([len(x) for _, c, r in pairs for x in (c, r)])
    assert prompts.max() <= 256 and prompts.min() >= 1
    assert max(len(p) + max(len(c), len(r)) for p, c, r in pairs) <= 512
    assert 54 <= np.median(prompts) <= 74 and 82 <= np.median(completions) <= 110
    ids = np.concatenate([x for pair in pairs for x in pair])
    assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 32768


def test_real_tokens_count_the_prompt_once_per_sequence():
    p, c, r = np.zeros(5, np.int32), np.zeros(7, np.int32), np.zeros(2, np.int32)
    assert bench_real.real_tokens("dpo", [(p, c, r)]) == 5 + 7 + 5 + 2
    rows = bench_real.sft_examples([(p, c, r)])
    assert [len(x) for x in rows[0]] == [5, 7] and [len(x) for x in rows[1]] == [5, 2]
    assert bench_real.real_tokens("sft", rows) == 19


def test_pytorch_full_and_fused_heads_agree():
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    real_torch = _load("_real_torch")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    full, fused = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    fused.load_state_dict(full.state_dict())
    add_fused_lm_head(fused)
    pairs = bench_real.sample_pairs(1, 300, seed=1)[0][:3]
    ids, attn, comp = real_torch._dpo_batch([(p[:9], c[:6], r[:4]) for p, c, r in pairs])
    with torch.no_grad():
        a = real_torch._sequence_logps(full, "full", ids, attn, comp)
        b = real_torch._sequence_logps(fused, "fused", ids, attn, comp)
        dense = torch.log_softmax(full(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
        ref = (dense.gather(2, ids[:, 1:, None]).squeeze(2) * comp[:, 1:]).sum(-1)
    assert a.shape == (6,) and torch.allclose(a, ref, atol=1e-4) and torch.allclose(b, ref, atol=1e-4)
