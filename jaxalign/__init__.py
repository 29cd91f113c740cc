"""jaxalign: a pure-JAX functional toolkit for aligning language models with preferences."""

__version__ = "0.1.0"

from jaxalign.logprobs import gather_logprobs, sequence_logprobs, token_logprobs
from jaxalign.masking import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "__version__",
    "gather_logprobs",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "sequence_logprobs",
    "token_logprobs",
]
