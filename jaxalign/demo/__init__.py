"""The jaxalign demo: the whole preference-alignment story on a 2-core CPU, no downloads.

``python -m jaxalign.demo [--quick] [--out runs/demo]`` (``make demo``) runs, each stage cached
under ``OUT/<stage>/`` (a re-run skips what is finished; see :mod:`jaxalign.demo.cache`):

1. ``corpus``: generated movie reviews, balanced positive/negative (:mod:`jaxalign.demo.task`);
   ``prompts``: the review openings used for preferences, PPO and evaluation;
2. ``tokenizer``: byte-level BPE (``Tokenizer.train_bpe``);
3. ``sft``: a small ``CausalLM`` pretrained on the reviews (``make_sft_step``);
4. ``preferences``: two SFT samples per prompt, labelled by a Bradley–Terry annotator on the
   gold reward, ``P(a ≻ b) = σ((g_a − g_b)/τ)``, written as ``{"prompt","chosen","rejected"}``
   JSONL and read back with ``jaxalign.data.load_jsonl``;
5. ``reward_model``: Bradley–Terry reward model from the SFT trunk; held-out accuracy vs gold;
6. ``ppo``: the one-jit RLHF step against the reward model with an adaptive KL coefficient,
   gold reward recorded every iteration (plus a fixed-β sweep, ``ppo_fixed_*``);
7. ``dpo_beta*`` (β swept), ``ipo``, ``orpo`` on the same pairs;
8. ``eval/*``: gold reward, KL to SFT and win rate vs SFT (bootstrap CI) of every policy
   (:mod:`jaxalign.evaluate`);
9. ``best_of_n``: best-of-n of the SFT model under the reward model, n ∈ {1, 4, 16}, as
   reference points on the reward–KL frontier (KL from the closed form ``log n − (n−1)/n``);
   ``rlaif_labels`` and ``rlaif_dpo``: the same pairs labelled by an AI judge (the reward model,
   through :mod:`jaxalign.feedback`), DPO on those soft labels, and the judge's agreement with
   gold (:mod:`jaxalign.demo.ai_feedback`).

Outputs in ``OUT``: ``report.json`` (schema in :mod:`jaxalign.evaluate`), ``report.md``,
``reward_curve.png`` and ``frontier.png``. The run checks the targets (reward-model accuracy,
win rates and their intervals — RLAIF-DPO's included — PPO's improvement), prints them with a results table and the
total wall time, and exits with status 1 if one fails (not enforced with ``--quick``).

``python -m jaxalign.demo --task math [--quick] [--out runs/demo_math]`` (``make demo-math``) is
the second demo: GRPO, Dr. GRPO and RLOO with a verifiable reward alone
(:func:`jaxalign.rewards.math_answer` through the one-jit step's ``pure_callback``) on small
addition problems, judged by held-out exact-match accuracy (:mod:`jaxalign.demo.math_rl`).
"""

from jaxalign.demo.config import FULL, QUICK, DemoConfig

__all__ = ["FULL", "QUICK", "DemoConfig"]
