"""What the LoRA tests share: the preference batch they train on (``2·rows`` token rows,
chosen first, no padding, completions from position 6) and adapters with a non-zero ``B``."""

import jax
import numpy as np


def pairs_batch(ids, rows: int, length: int) -> dict[str, np.ndarray]:
    """``{chosen,rejected}_{ids,attention_mask,completion_mask}`` from ``ids [2·rows, length]``."""
    ids = np.asarray(ids)
    completion = np.zeros((rows, length), np.int32)
    completion[:, 6:] = 1
    ones = np.ones((rows, length), np.int32)
    return {"chosen_ids": ids[:rows], "rejected_ids": ids[rows:], "chosen_attention_mask": ones,
            "rejected_attention_mask": ones, "chosen_completion_mask": completion,
            "rejected_completion_mask": completion}


def perturb_b(params, scale: float, seed: int):
    """``params`` with ``scale · N(0, 1)`` noise on every ``lora_b`` (one key per leaf): a
    non-zero ``B``, as after training, so the adapters' path shows."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        leaf + scale * jax.random.normal(k, leaf.shape) if path[-1].key == "lora_b" else leaf
        for (path, leaf), k in zip(leaves, keys)])
