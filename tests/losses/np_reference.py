"""Float64 NumPy pieces the loss tests write their paper references with."""

import numpy as np


def np_log_sigmoid(x):
    """``log σ(x)`` in float64, stable for large ``|x|``."""
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def log_ratios(batch):
    """``(log π(y_w)/π_ref(y_w), log π(y_l)/π_ref(y_l))`` of a ``preference_logps`` batch, in
    float64."""
    f64 = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    return (f64["policy_chosen_logps"] - f64["ref_chosen_logps"],
            f64["policy_rejected_logps"] - f64["ref_rejected_logps"])
