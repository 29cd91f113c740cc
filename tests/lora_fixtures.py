"""The preference batch the LoRA tests train on: ``2·rows`` token rows (chosen first), no
padding, completions from position 6."""

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
