"""Every stop id ends a completion in best-of-N and in the RLHF step's bookkeeping (``has_eos``,
behind ``missing_eos_penalty`` and ``completions/clipped_ratio``), as in the sampler
(``test_sampling.py``)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import CausalLM, get_config, init_params
from jaxalign.train import best_of_n
from jaxalign.train import rlhf
from jaxalign.train.rlhf_config import RLHFConfig


def test_best_of_n_stops_on_any_stop_id():
    """Every id a stop id: each of the n samples of every prompt ends after one token."""
    model = CausalLM(get_config("tiny", vocab_size=64, n_layers=1))
    params = init_params(model, jax.random.key(0))
    prompts = {"prompt_ids": np.full((2, 4), 3, np.int32), "prompt_mask": np.ones((2, 4), np.int32)}
    out = best_of_n.best_of_n(model, params, lambda p, pm, c, cm: jnp.sum(cm, axis=1) * 1.0,
                              prompts, 2, jax.random.key(1), max_new_tokens=6,
                              eos_id=list(range(64)))
    np.testing.assert_array_equal(np.asarray(out.completion_mask).sum(axis=-1), 1)


def test_rlhf_bookkeeping_counts_every_stop_id():
    config = RLHFConfig(eos_id=(2, 5))
    completion = jnp.asarray([[7, 5, 0], [7, 8, 9], [2, 0, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(rlhf._has_eos(config, completion, mask), [True, False, True])
    masked_out = mask.at[0, 1].set(0)  # a stop id in the padding does not count
    np.testing.assert_array_equal(rlhf._has_eos(config, completion, masked_out),
                                  [False, False, True])
