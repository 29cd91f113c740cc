"""Autoregressive sampling from a causal LM, compiled end to end.

One ``jit``: a prefill over the (left-padded) prompts fills a :class:`~jaxalign.models.KVCache`,
which then grows once to ``P + N − 1`` slots, and a ``lax.while_loop`` decodes one
token per step and stops as soon as every row has produced EOS (or after ``max_new_tokens``).
Both run the model's ``decode`` method (``CausalLM`` and ``CausalLMWithValueHead`` have one),
which projects only the last position onto the vocabulary. Shapes are static, so a second call
with the same shapes reuses the compiled program.

Log-probabilities returned (both float32, 0 where ``completion_mask`` is 0):

* ``logps``: ``log q(y_t)`` under the distribution the token was actually drawn from, i.e.
  after temperature, top-k and top-p. Greedy decoding (``temperature=0``) draws from a point
  mass, so its ``logps`` are 0.
* ``policy_logps``: ``log π(y_t | y_<t)`` of the unmodified policy (temperature 1, no
  filtering) — what PPO needs as ``π_old``. Equal to ``logps`` at temperature 1 without
  filtering.

Sampling draws one uniform number per row and inverts the CDF (a two-level cumulative sum done
with small matmuls); on CPU this is far cheaper than Gumbel-max, which needs ``V`` random
numbers per row per step.

Files: ``tokens.py`` (one token per row: temperature, top-k, top-p, inverse-CDF draws) and
``generate.py`` (prefill, KV cache and the decode loop).
"""

from jaxalign.sampling.generate import (
    GenerateOutput,
    generate,
    is_stop_token,
    make_generate,
    stop_ids,
)
from jaxalign.sampling.tokens import sample_token

__all__ = ["GenerateOutput", "generate", "is_stop_token", "make_generate", "sample_token",
           "stop_ids"]
