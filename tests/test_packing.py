"""Packed batches: every token once, segments inside rows, restarting positions, targets that
point at the right predecessor slot, counted truncation, one shape for every batch.

References are rebuilt independently from the examples (the padded batch's
``[prompt | completion]`` rows): a target must predict ``completion[j]`` from the slot holding
the token before it in that padded row (``prompt[-1]`` for ``j = 0``).
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.data import (
    DataConfig, DataReport, Dataset, Example, PackedLoader, PackingConfig, PackSpec, load_jsonl,
    pad_pairs,
)
from jaxalign.data._packing import fit_example, pack
from jaxalign.tokenizer import Tokenizer


def _examples(draw_lengths, kind):
    rng = np.random.default_rng(len(draw_lengths))
    examples = []
    for lengths in draw_lengths:
        ids = [rng.integers(3, 90, n).astype(np.int32) for n in lengths]
        masks = ()
        if kind == "pairs" and lengths[0] % 3 == 0:  # some conversational masks with holes
            masks = tuple((np.arange(len(c)) % 4 != 1).astype(np.int32) for c in ids[1:])
        examples.append(Example(ids[0], tuple(ids[1:]), margin=float(len(examples)),
                                completion_masks=masks))
    return examples


def _dataset(examples, kind):
    return Dataset("preference" if kind == "pairs" else "sft", examples,
                   DataConfig(pad_multiple=8), 0, DataReport("memory"))


lengths_strategy = {
    "pairs": st.lists(st.tuples(st.integers(1, 12), st.integers(1, 10), st.integers(1, 10)),
                      min_size=1, max_size=12),
    "sequences": st.lists(st.tuples(st.integers(1, 12), st.integers(1, 14)), min_size=1,
                          max_size=12),
}


def _expected_targets(example, kind, include_prompt=False):
    """``{(completion k, token, predecessor token)}`` multiset of one example (uncut), from
    its padded rows ``[prompt | completion_k]``."""
    expected = []
    completions = example.completion_ids if kind == "pairs" else example.completion_ids[:1]
    for k, completion in enumerate(completions):
        row = np.concatenate([example.prompt_ids, completion])
        mask = np.concatenate([np.full(len(example.prompt_ids), int(include_prompt)),
                               example.completion_masks[k] if example.completion_masks
                               else np.ones(len(completion), int)])
        if include_prompt and k > 0:
            mask[:len(example.prompt_ids)] = 0  # a prompt is trained once
        expected += [(k, int(row[j]), int(row[j - 1])) for j in range(1, len(row)) if mask[j]]
    return sorted(expected)


def _check_batch(batch, examples, kind, spec, include_prompt=False):
    ids = batch["ids" if kind == "pairs" else "input_ids"]
    assert ids.shape == (spec.rows, spec.length)
    assert batch["target_group"].shape == (spec.rows, spec.targets)
    capacity = spec.capacity
    seen = set()
    for p, example in enumerate(examples):
        groups = (p, capacity + p) if kind == "pairs" else (p,)
        rows = {r for g in groups for r in np.nonzero(batch["target_group"] == g)[0]}
        # the example's segment: the one whose tokens spell its pieces
        pieces = [example.prompt_ids, *(example.completion_ids if kind == "pairs"
                                        else example.completion_ids[:1])]
        found = None
        for row in range(spec.rows):
            for segment in range(1, batch["segment_ids"][row].max() + 1):
                slots = np.flatnonzero(batch["segment_ids"][row] == segment)
                if (row, segment) not in seen and np.array_equal(ids[row, slots],
                                                                 np.concatenate(pieces)):
                    found = (row, segment, slots)
                    break
            if found:
                break
        assert found is not None, f"example {p} is not one contiguous segment of one row"
        row, segment, slots = found
        seen.add((row, segment))
        assert np.all(np.diff(slots) == 1) and (not rows or rows == {row})
        branches, positions = batch["branch_ids"][row, slots], batch["positions"][row, slots]
        n_prompt = len(example.prompt_ids)
        expected_positions = np.concatenate([np.arange(n_prompt)] + [
            n_prompt + np.arange(len(c)) for c in pieces[1:]])
        np.testing.assert_array_equal(positions, expected_positions)
        if kind == "pairs":
            np.testing.assert_array_equal(branches, np.repeat([0, 1, 2], [len(x) for x in pieces]))
        got = []
        for k, g in enumerate(groups):
            for r, t in zip(*np.nonzero(batch["target_group"] == g)):
                source = batch["target_source"][r, t]
                assert batch["segment_ids"][r, source] == segment
                assert batch["branch_ids"][r, source] in (0, k + 1)
                got.append((k, int(batch["target_token"][r, t]), int(ids[r, source])))
        assert sorted(got) == _expected_targets(example, kind, include_prompt)
    assert len(seen) == len(examples) == int(batch[
        "pair_valid" if kind == "pairs" else "sequence_valid"].sum())
    assert np.all(batch["target_group"] < (2 if kind == "pairs" else 1) * capacity)
    assert int(batch["attention_mask"].sum()) == sum(
        len(e.prompt_ids) + sum(len(c) for c in (e.completion_ids if kind == "pairs"
                                                  else e.completion_ids[:1])) for e in examples)


@pytest.mark.parametrize("kind", ["pairs", "sequences"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_batch_of_an_epoch_holds_its_examples_exactly(kind, data):
    examples = _examples(data.draw(lengths_strategy[kind]), kind)
    batch_size = data.draw(st.integers(1, 4))
    loader = PackedLoader(_dataset(examples, kind), batch_size, PackingConfig(packing=kind),
                          seed=data.draw(st.integers(0, 3)))
    assert loader.report.tokens_cut == 0  # the default row fits the longest example
    plan = [loader.indices_at(s) for s in range(len(loader._plan(0)))]
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(examples)))
    for indices in plan:
        batch = loader.collate(indices)
        _check_batch(batch, [examples[i] for i in indices], kind, loader.spec)
        if kind == "pairs":
            np.testing.assert_array_equal(batch["margin"][:len(indices)], indices)


@settings(max_examples=10, deadline=None)
@given(lengths=lengths_strategy["sequences"])
def test_sft_include_prompt_targets_every_token_after_the_first(lengths):
    examples = _examples(lengths, "sequences")
    loader = PackedLoader(_dataset(examples, "sequences"), 3,
                          PackingConfig(packing="sequences"), include_prompt=True)
    for step in range(len(loader._plan(0))):
        indices = loader.indices_at(step)
        _check_batch(loader.collate(indices), [examples[i] for i in indices], "sequences",
                     loader.spec, include_prompt=True)


@settings(max_examples=15, deadline=None)
@given(prompt=st.integers(1, 20), chosen=st.integers(1, 20), rejected=st.integers(1, 20),
       length=st.integers(3, 24), targets=st.integers(2, 24))
def test_truncation_keeps_prompt_end_completion_starts_and_counts_the_cut(
        prompt, chosen, rejected, length, targets):
    example = _examples([(prompt, chosen, rejected)], "pairs")[0]
    item = fit_example(example, "pairs", length, targets)
    (p_ids, _), (c_ids, _), (r_ids, _) = item.pieces
    assert item.slots == len(p_ids) + len(c_ids) + len(r_ids) <= length
    assert item.targets <= targets and min(len(c_ids), len(r_ids)) >= 1
    np.testing.assert_array_equal(p_ids, example.prompt_ids[len(example.prompt_ids) - len(p_ids):])
    np.testing.assert_array_equal(c_ids, example.completion_ids[0][:len(c_ids)])
    np.testing.assert_array_equal(r_ids, example.completion_ids[1][:len(r_ids)])
    assert item.cut == prompt + chosen + rejected - item.slots
    if prompt + chosen + rejected <= length and chosen + rejected <= targets:
        assert item.cut == 0


def test_loader_reports_cut_tokens_and_fill_and_keeps_one_shape():
    examples = _examples([(5, 30, 4), (3, 3, 3), (2, 6, 9), (8, 2, 2)] * 3, "pairs")
    loader = PackedLoader(_dataset(examples, "pairs"), 2,
                          PackingConfig(packing="pairs", pack_length=16, pack_rows=2))
    assert loader.spec.length == 16 and loader.spec.rows == 2 and loader.spec.capacity == 4
    # water-filled cuts: (5, 30, 4) -> (5, 7, 4), 23 tokens; (2, 6, 9) -> (2, 6, 8), 1 token
    assert loader.report.num_cut == 6 and loader.report.tokens_cut == 3 * 23 + 3 * 1
    shapes = {tuple((k, v.shape) for k, v in sorted(loader.batch_at(s).items()))
              for s in range(3 * len(loader._plan(0)))}
    assert len(shapes) == 1
    report = loader.report
    assert report.real_tokens == sum(item.slots for item in loader.items)
    assert report.slots == len(loader._plan(0)) * 2 * 16 and 0 < report.efficiency <= 1
    assert "6 examples cut to fit a row (72 tokens)" in report.summary()


def test_loader_is_a_pure_function_of_seed_and_step_and_restores():
    examples = _examples([(3, 4, 5), (2, 2, 2), (6, 1, 3)] * 5, "pairs")
    make = lambda seed: PackedLoader(_dataset(examples, "pairs"), 3,  # noqa: E731
                                     PackingConfig(packing="pairs"), seed=seed)
    a, b = make(0), make(0)
    later = [a.indices_at(s).tolist() for s in range(12)]
    assert later == [b.indices_at(s).tolist() for s in reversed(range(12))][::-1]
    assert later != [make(1).indices_at(s).tolist() for s in range(12)]
    next(a), next(a)
    c = make(0)
    c.restore(json.loads(json.dumps(a.state())))
    np.testing.assert_array_equal(next(c)["ids"], next(a)["ids"])
    with pytest.raises(ValueError, match="loader state has seed=0 but this loader has seed=1"):
        make(1).restore(a.state())


def test_bad_packing_requests_are_refused_by_name():
    sft = _dataset(_examples([(2, 3)], "sequences"), "sequences")
    with pytest.raises(ValueError, match="packing='pairs' packs preference records, but the"
                                         " data holds sft records"):
        PackedLoader(sft, 2, PackingConfig(packing="pairs"))
    with pytest.raises(ValueError, match="packing must be one of"):
        PackingConfig(packing="rows")
    with pytest.raises(ValueError, match="pack_rows must be positive, got 0"):
        PackingConfig(packing="pairs", pack_rows=0)
    items = [fit_example(e, "sequences", 8, 8) for e in _examples([(4, 4)] * 3, "sequences")]
    with pytest.raises(ValueError, match="3 sequences do not fit a packed batch"):
        pack(items, PackSpec(rows=2, length=8, capacity=4, targets=8), "sequences", 0)


def test_pad_pairs_and_a_real_jsonl_file(tmp_path):
    np.testing.assert_array_equal(pad_pairs(np.array([5.0, 6.0, 7.0]), np.array([2, 0]), 4),
                                  [7.0, 5.0, 0.0, 0.0])
    tokenizer = Tokenizer.train_bpe(["a small corpus of words"] * 4, vocab_size=300)
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": "a small" * (i + 1), "chosen": "corpus", "rejected": "of words " * i}
               for i in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = load_jsonl(path, tokenizer, config=DataConfig(max_length=64, pad_multiple=16))
    loader = PackedLoader(dataset, 2, PackingConfig(packing="pairs"))
    for step in range(len(loader._plan(0))):
        indices = loader.indices_at(step)
        _check_batch(loader.collate(indices), [dataset.examples[i] for i in indices], "pairs",
                     loader.spec)


def test_cli_dpo_with_packed_pairs_and_refusals(tmp_path, capsys):
    from jaxalign import cli

    words = ["cat", "dog", "sun", "moon", "tree", "fish"]
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": f"Say {w}:" + " please" * (i % 4), "chosen": f" yes {w} good",
        "rejected": f" no {w} bad" + " bad" * (i % 3)}) + "\n"
        for i, w in enumerate(words * 3)))
    tiny = json.dumps({"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64})
    flags = ["--data", str(data), "--steps", "2", "--batch-size", "3", "--max-length", "64",
             "--log-every", "1", "--no-progress", "--model-overrides", tiny]
    assert cli.main(["dpo", *flags, "--out", str(tmp_path / "run"), "--packing", "pairs",
                     "--precompute-ref"]) == 0
    err = capsys.readouterr().err
    assert "packing pairs: " in err and "0 examples cut to fit a row (0 tokens)" in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert abs(metrics[0]["loss"] - np.log(2)) < 1e-5  # policy == reference at step 1
    assert cli.main(["dpo", *flags, "--out", str(tmp_path / "mesh"), "--packing", "pairs",
                     "--batch-size", "4", "--mesh", "data=2", "--precompute-ref"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "mesh" / "metrics.jsonl").open()]
    assert abs(metrics[0]["loss"] - np.log(2)) < 1e-5 and metrics[1]["loss"] < metrics[0]["loss"]
    assert cli.main(["sft", *flags, "--out", str(tmp_path / "sft"), "--packing", "pairs"]) == 2
    assert "sft takes --packing none or sequences, got --packing pairs" in capsys.readouterr().err


def test_readme_packing_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Packing and blockwise attention\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    examples = _examples([(4, 3, 5), (2, 6, 2), (7, 1, 3)] * 4, "pairs")
    namespace = {"dataset": _dataset(examples, "pairs")}
    exec(code, namespace)  # noqa: S102
    assert namespace["batch"]["ids"].shape == (namespace["loader"].spec.rows,
                                               namespace["loader"].spec.length)
    assert "packing pairs:" in capsys.readouterr().out


def test_sharded_packing_renumbers_groups_into_one_global_batch():
    from jaxalign.data import ShardedPackedLoader

    examples = _examples([(3, 4, 5), (2, 2, 2), (6, 1, 3), (1, 5, 2)] * 4, "pairs")
    shards = {k: _dataset(examples[k::2], "pairs") for k in range(2)}
    loader = ShardedPackedLoader(shards, 4, PackingConfig(packing="pairs"), num_shards=2)
    spec = loader.spec
    assert {tuple(s.spec) for s in loader.shards.values()} == {tuple(spec)}
    global_spec = spec._replace(rows=2 * spec.rows, capacity=2 * spec.capacity)
    for step in range(3):
        indices = loader.indices_at(step)
        batch = loader.collate(indices)
        # shard k's pairs sit in pair slots k·P ... and their groups are numbered globally
        pairs = [shards[k].examples[i] for k in (0, 1) for i in indices[k]]
        order = [*indices[0], *([None] * (spec.capacity - len(indices[0]))), *indices[1]]
        assert batch["pair_valid"].tolist() == [float(i is not None) for i in order] + [0.0] * (
            2 * spec.capacity - len(order))
        position = {int(slot): n for n, slot in enumerate(np.flatnonzero(batch["pair_valid"]))}
        capacity = global_spec.capacity

        def relabel(group):  # global group -> the group of pair n of `pairs` in a compact batch
            if group < 0:
                return -1
            rejected = group >= capacity
            return position[int(group) - capacity * rejected] + len(pairs) * rejected

        compact = dict(batch, target_group=np.vectorize(relabel)(batch["target_group"]))
        compact["pair_valid"] = np.ones(len(pairs), np.float32)
        _check_batch(compact, pairs, "pairs", global_spec._replace(capacity=len(pairs)))
