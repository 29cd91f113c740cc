"""The demo's settings: one frozen dataclass, a full preset and a ``--quick`` preset."""

from __future__ import annotations

import dataclasses
from typing import Any


class SequenceLengths:
    """What both demos' configs derive from their ``prompt_len`` and ``max_new_tokens``."""

    prompt_len: int
    max_new_tokens: int

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DemoConfig(SequenceLengths):
    """Every number the demo uses. Sequences are ``prompt_len + max_new_tokens`` tokens."""

    seed: int = 0
    # corpus and tokenizer
    num_reviews: int = 20_000
    vocab_size: int = 512
    prompt_len: int = 8  # BOS + opening, left-padded
    max_new_tokens: int = 24  # completion incl. EOS
    # model (shared by policy, reward and value models)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 172
    # SFT
    sft_steps: int = 500
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # preference data
    pref_prompts: int = 4096
    bt_temperature: float = 0.5  # labels agree with gold on ~93% of pairs
    heldout_fraction: float = 0.1
    gen_batch: int = 64  # every standalone generate call has this batch size
    # reward model
    rm_epochs: int = 5
    rm_batch: int = 32
    rm_lr: float = 1.5e-3
    # PPO (adaptive KL) and its fixed-β sweep
    ppo_iterations: int = 60
    ppo_batch: int = 64
    ppo_lr: float = 1e-3
    ppo_value_lr: float = 1e-3
    ppo_kl_coef: float = 0.05
    ppo_kl_target: float = 6.0
    ppo_kl_horizon: float = 2_000.0
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    ppo_missing_eos_penalty: float = 1.0  # subtracted from the score of a review without EOS
    ppo_sweep: tuple[float, ...] = (0.02, 0.1, 0.5)
    # DPO (β swept), IPO, ORPO
    pref_epochs: int = 1
    pref_batch: int = 32
    pref_lr: float = 1e-3
    dpo_beta: float = 0.1
    dpo_sweep: tuple[float, ...] = (0.03, 0.1, 0.3)
    ipo_beta: float = 0.5  # IPO margin 1/(2β) is per token (mean log-probs): 1 nat
    orpo_lambda: float = 5.0
    orpo_lr: float = 3e-3  # no reference model: the learning rate is ORPO's only leash
    # SimPO (reference-free, per-token mean log-probs) and KTO (the pairs split into desirable
    # chosen and undesirable rejected completions): frontier points, not targets
    simpo_beta: float = 2.0  # the paper's range is 2.0-2.5
    simpo_gamma: float = 0.5
    kto_beta: float = 0.1
    # evaluation
    eval_prompts: int = 512
    bon_n: tuple[int, ...] = (1, 4, 16)  # best-of-N reference points (reward model picks)
    quick: bool = False


FULL = DemoConfig()

QUICK = dataclasses.replace(
    FULL,
    num_reviews=4_000,
    sft_steps=80,
    pref_prompts=384,
    rm_epochs=1,
    ppo_iterations=10,
    ppo_sweep=(),
    pref_epochs=1,
    dpo_sweep=(),
    eval_prompts=128,
    quick=True,
)
