"""SequenceLayout in the trunk: a packed row computes what its sequences compute alone.

References are independent runs of the unpacked model: each packed sequence alone, and for a
shared-prompt row ``[prompt | chosen | rejected]`` the rows ``[prompt | chosen]`` and
``[prompt | rejected]``. Configs cover sliding windows (small enough to bite), Gemma-style
sandwich norms, soft-capping, q/k norms, a local rope base and scanned layers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import get_config, init_cache
from jaxalign.models.layout import SequenceLayout, allowed_mask
from jaxalign.models.transformer import Transformer

TINY = get_config("tiny", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48)
GEMMA = dataclasses.replace(
    TINY, post_norms=True, norm_scale_offset=1.0, qk_norm=True, embed_scale=True,
    attn_logit_softcap=5.0, query_pre_attn_scalar=12.0, sliding_window=3,
    layer_types=("sliding_attention", "full_attention"), local_rope_theta=100.0,
    mlp_activation="gelu_tanh")
CONFIGS = {
    "llama": dataclasses.replace(TINY, attention_impl="dense"),
    "mistral_window": dataclasses.replace(TINY, sliding_window=4),
    "gemma": GEMMA,
    # scanned layers (a traced sliding flag) and the blockwise kernel (5 does not divide 24)
    "gemma_scanned_blockwise": dataclasses.replace(GEMMA, scan_layers=True,
                                                   attention_impl="blockwise", attention_block=5),
}
ROW = 24


class _Jitted:
    """``model.apply`` under one jit per model (eager flax compiles op by op: slow)."""

    def __init__(self, model):
        self.model = model
        self._run = jax.jit(lambda v, t, m, layout: model.apply(v, t, m, layout=layout)[0])

    def apply(self, variables, tokens, mask=None, layout=None):
        return self._run(variables, tokens, mask, layout), None


def _params(config):
    model = Transformer(config)
    tokens = jnp.zeros((1, ROW), jnp.int32)
    return _Jitted(model), jax.jit(model.init)(jax.random.key(0), tokens)


def _alone(model, variables, sequences):
    """Each sequence's hidden states, run as its own row (right-padded into one batch so it
    compiles once; right padding changes no real token)."""
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    mask = np.zeros_like(tokens)
    for b, sequence in enumerate(sequences):
        tokens[b, :len(sequence)], mask[b, :len(sequence)] = sequence, 1
    hidden, _ = model.apply(variables, tokens, mask)
    return [np.asarray(hidden[b, :len(s)]) for b, s in enumerate(sequences)]


def _pack(pieces):
    """One row of ``ROW`` slots from ``(tokens, position_start, segment, branch)`` pieces."""
    ids, positions, segments, branches = (np.zeros(ROW, np.int32) for _ in range(4))
    slot = 0
    for tokens, start, segment, branch in pieces:
        end = slot + len(tokens)
        ids[slot:end], positions[slot:end] = tokens, start + np.arange(len(tokens))
        segments[slot:end], branches[slot:end] = segment, branch
        slot = end
    return ids, SequenceLayout(positions, segments, branches)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_sequences_equal_each_alone(name):
    model, variables = _params(CONFIGS[name])
    rng = np.random.default_rng(1)
    sequences = [rng.integers(1, 64, n) for n in (7, 9, 5)]  # 21 of 24 slots, 3 padding
    ids, layout = _pack([(s, 0, k + 1, 0) for k, s in enumerate(sequences)])
    hidden, _ = model.apply(variables, ids[None], layout=jax.tree.map(lambda a: a[None], layout))
    slot = 0
    for sequence, alone in zip(sequences, _alone(model, variables, sequences)):
        np.testing.assert_allclose(np.asarray(hidden[0, slot:slot + len(sequence)]), alone,
                                   atol=1e-5, rtol=1e-5)
        slot += len(sequence)
    assert np.all(np.isfinite(np.asarray(hidden)))  # padding slots too


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shared_prompt_row_equals_the_two_rows(name):
    """``[p1 | c1 | r1 | p2 | c2 | r2]``: each completion sees its prompt only, and the rejected
    one continues the prompt's positions, as ``[p | c]`` and ``[p | r]`` run separately."""
    model, variables = _params(CONFIGS[name])
    rng = np.random.default_rng(2)
    pairs = [tuple(rng.integers(1, 64, n) for n in lengths) for lengths in ((5, 4, 3), (3, 2, 6))]
    pieces = []
    for k, (prompt, chosen, rejected) in enumerate(pairs):
        pieces += [(prompt, 0, k + 1, 0), (chosen, len(prompt), k + 1, 1),
                   (rejected, len(prompt), k + 1, 2)]
    ids, layout = _pack(pieces)
    hidden, _ = model.apply(variables, ids[None], layout=jax.tree.map(lambda a: a[None], layout))
    hidden = np.asarray(hidden[0])
    alone = _alone(model, variables, [np.concatenate([p, c]) for p, c, _ in pairs]
                   + [np.concatenate([p, r]) for p, _, r in pairs])
    slot = 0
    for k, (prompt, chosen, rejected) in enumerate(pairs):
        with_chosen, with_rejected = alone[k], alone[len(pairs) + k]
        p, c, r = len(prompt), len(chosen), len(rejected)
        np.testing.assert_allclose(hidden[slot:slot + p + c], with_chosen, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(hidden[slot + p + c:slot + p + c + r], with_rejected[p:],
                                   atol=1e-5, rtol=1e-5)
        slot += p + c + r


def test_no_layout_is_the_padded_model_and_layout_of_a_padded_row_matches():
    """A layout describing an ordinary left-padded row gives that row's hidden states."""
    model, variables = _params(CONFIGS["gemma"])
    tokens = np.random.default_rng(3).integers(1, 64, (1, ROW)).astype(np.int32)
    mask = np.ones((1, ROW), np.int32)
    mask[0, :4] = 0
    padded, _ = model.apply(variables, tokens, mask)
    layout = SequenceLayout(np.maximum(np.cumsum(mask, -1) - 1, 0), mask, np.zeros_like(mask))
    packed, _ = model.apply(variables, tokens, layout=layout)
    np.testing.assert_allclose(np.asarray(packed[0, 4:]), np.asarray(padded[0, 4:]), atol=1e-5)


def test_allowed_mask_rule_by_hand():
    # [p p c r r | q q] : segment 1 with branches, then segment 2; window 2 by position.
    layout = SequenceLayout(positions=np.array([[0, 1, 2, 2, 3, 0, 1]]),
                            segment_ids=np.array([[1, 1, 1, 1, 1, 2, 2]]),
                            branch_ids=np.array([[0, 0, 1, 2, 2, 0, 0]]))
    allowed = np.asarray(allowed_mask(layout))[0].astype(int)
    np.testing.assert_array_equal(allowed, [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],  # rejected's first token: the prompt and itself, not chosen
        [1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1]])
    windowed = np.asarray(allowed_mask(layout, 2))[0].astype(int)
    assert windowed[4].tolist() == [0, 0, 0, 1, 1, 0, 0]  # position 3 sees positions 2, 3
    assert windowed[3].tolist() == [0, 1, 0, 1, 0, 0, 0]


def test_bad_layouts_are_refused_by_name():
    model, variables = _params(TINY)
    model = model.model
    tokens = np.ones((1, ROW), np.int32)
    good = SequenceLayout(*(np.zeros((1, ROW), np.int32) for _ in range(3)))
    with pytest.raises(ValueError, match=r"layout.segment_ids has shape \(1, 5\)"):
        model.apply(variables, tokens, layout=good._replace(segment_ids=np.zeros((1, 5), int)))
    with pytest.raises(ValueError, match="layout.branch_ids must be integer"):
        model.apply(variables, tokens, layout=good._replace(branch_ids=np.zeros((1, ROW))))
    with pytest.raises(ValueError, match="layout and cache are exclusive"):
        model.apply(variables, tokens, cache=init_cache(TINY, 1, ROW), layout=good)
