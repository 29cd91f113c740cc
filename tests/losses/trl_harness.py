"""Run TRL 1.16's own loss code on log-probs a test chooses (for ``tests/losses/test_trl_*``).

TRL computes its preference losses inside trainer methods, not in free functions. These helpers
call the real, unbound methods with a stub ``self`` (a ``SimpleNamespace`` holding just the
attributes the method reads; a missing one raises ``AttributeError``, so a TRL change that reads
something new fails loudly instead of silently using a default) and a stub model:

- :func:`trl_dpo` calls ``trl.DPOTrainer._compute_loss`` (every ``loss_type`` of DPOTrainer,
  and combinations with ``loss_weights``). The stub model plays the part of the fused LM head
  TRL patches onto the model (``trl.trainer.utils.add_fused_lm_head``): it returns the chosen
  per-token log-probs, zeroed where the shifted label is ``-100``, as that head does.
- :func:`trl_cpo` calls ``CPOTrainer.get_batch_loss_metrics`` (and through it the real
  ``concatenated_forward``, ``get_batch_logps``, ``cpo_loss``); its stub model returns logits,
  so TRL computes the sequence log-probs and the NLL term itself.
- :func:`trl_kto` calls ``trl.KTOTrainer._compute_loss`` (and through it ``_compute_kl_logps``).

Sequence log-probs for jaxalign are reduced from the same float32 tensors with the same torch
ops TRL uses (``sum(dim=1)``), so both sides see bit-identical inputs. Each helper returns the
loss and the gradient of the loss with respect to the per-token inputs (TRL's autograd).
"""

from __future__ import annotations

import collections
import types
from dataclasses import dataclass

import numpy as np
import torch
from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer

PROMPT_LEN = 4


class _Accelerator:
    """Single-process stand-in for ``accelerate.Accelerator``: gathers are identities."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor):
        return tensor

    @staticmethod
    def gather_for_metrics(tensor):
        return tensor

    @staticmethod
    def unwrap_model(model):
        return model


def _metrics():
    return collections.defaultdict(lambda: collections.defaultdict(list))


class _FusedHeadModel:
    """Stand-in for a model patched by ``add_fused_lm_head``, called with ``fused_lm_head=True``.

    ``sequences`` maps each registered ``input_ids`` tensor to its per-token log-probs
    ``[N, T - 1]`` (position ``t`` scores token ``t + 1``). Like the real head, the output is
    zero wherever the shifted label is ``-100``.
    """

    def __init__(self, *sequences):
        self.sequences = sequences  # pairs (input_ids [N, T], token_logps [N, T - 1])
        self.calls = 0

    def __call__(self, *, input_ids, attention_mask, labels, fused_lm_head, use_cache=None):
        assert fused_lm_head, "TRL 1.16 always asks for the fused LM head here"
        (token_logps,) = [lp for ids, lp in self.sequences if torch.equal(ids, input_ids)]
        mask = labels[:, 1:] != -100
        self.calls += 1
        zeros = torch.zeros(mask.shape)
        return types.SimpleNamespace(
            log_probs=token_logps.masked_fill(~mask, 0.0),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(mask.shape, dtype=torch.bool),
            log_sum_sq_probs=None,
            aux_loss=None,
        )


# ------------------------------------------------------------------------- sequence batches
@dataclass(frozen=True)
class Sequences:
    """``N`` right-padded prompt+completion rows and per-token log-probs of their completions.

    ``token_logps[n, t]`` is the log-prob of token ``t + 1`` (TRL's shifted layout), negative on
    completion tokens and 0 elsewhere; ``logps`` / ``mean_logps`` are its sum / mean over the
    completion, computed in float32 torch exactly as TRL reduces them.
    """

    input_ids: torch.Tensor  # [N, T] int64
    attention_mask: torch.Tensor  # [N, T] int64
    completion_mask: torch.Tensor  # [N, T] int64, 0 on the prompt and on padding
    token_logps: torch.Tensor  # [N, T - 1] float32

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask.sum(dim=1).numpy()

    @property
    def logps(self) -> np.ndarray:
        return self.token_logps.sum(dim=1).numpy()

    @property
    def mean_logps(self) -> np.ndarray:
        length = self.completion_mask.sum(dim=1).clamp(min=1)
        return (self.token_logps.sum(dim=1) / length).numpy()


def make_sequences(rng, seq_logps, lengths, *, token_offset=10) -> Sequences:
    """Rows whose completions have ``lengths`` tokens and (about) ``seq_logps`` log-prob sums.

    Each row's sum is split over its tokens by Dirichlet(1) weights, so single tokens range
    from near 0 to most of the sum. Token ids start at ``token_offset`` so that batches built
    with different offsets are told apart by the stub model.
    """
    seq_logps = np.asarray(seq_logps, np.float64)
    lengths = np.asarray(lengths, np.int64)
    n, width = len(lengths), PROMPT_LEN + int(lengths.max())
    input_ids = rng.integers(token_offset, token_offset + 1000, size=(n, width))
    attention_mask = np.zeros((n, width), np.int64)
    completion_mask = np.zeros((n, width), np.int64)
    token_logps = np.zeros((n, width - 1), np.float32)
    for i, (total, length) in enumerate(zip(seq_logps, lengths, strict=True)):
        attention_mask[i, : PROMPT_LEN + length] = 1
        completion_mask[i, PROMPT_LEN : PROMPT_LEN + length] = 1
        token_logps[i, PROMPT_LEN - 1 : PROMPT_LEN - 1 + length] = total * rng.dirichlet(
            np.ones(length)
        )
    input_ids = np.where(attention_mask == 1, input_ids, 0)
    return Sequences(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        completion_mask=torch.from_numpy(completion_mask),
        token_logps=torch.from_numpy(token_logps),
    )


@dataclass(frozen=True)
class PairBatch:
    """``B`` preference pairs in TRL's concatenated layout: rows ``[chosen..., rejected...]``."""

    sequences: Sequences  # 2B rows
    ref_chosen_logps: np.ndarray  # [B] float32 (precomputed, as TRL's precompute_ref_log_probs)
    ref_rejected_logps: np.ndarray  # [B] float32

    @property
    def size(self) -> int:
        return len(self.ref_chosen_logps)

    def chosen(self, values):
        return np.asarray(values)[: self.size]

    def rejected(self, values):
        return np.asarray(values)[self.size :]

    @property
    def policy_chosen_logps(self):
        return self.chosen(self.sequences.logps)

    @property
    def policy_rejected_logps(self):
        return self.rejected(self.sequences.logps)

    def summed(self):
        """The four ``[B]`` summed log-probs, in jaxalign's argument order."""
        return (
            self.policy_chosen_logps,
            self.policy_rejected_logps,
            self.ref_chosen_logps,
            self.ref_rejected_logps,
        )

    def averaged(self):
        """The four per-token mean log-probs (reference sums divided by the same lengths)."""
        length = self.sequences.completion_mask.sum(dim=1).clamp(min=1)
        means = self.sequences.mean_logps
        return (
            self.chosen(means),
            self.rejected(means),
            (torch.from_numpy(self.ref_chosen_logps) / length[: self.size]).numpy(),
            (torch.from_numpy(self.ref_rejected_logps) / length[self.size :]).numpy(),
        )

    def chosen_mean_nll(self):
        """``[B]`` per-token mean NLL of each chosen completion (RPO paper, per sequence)."""
        return -self.chosen(self.sequences.mean_logps)

    def swapped(self) -> PairBatch:
        """The same pairs with the labels flipped: rejected rows first."""
        order = torch.cat([torch.arange(self.size, 2 * self.size), torch.arange(self.size)])
        seqs = self.sequences
        return PairBatch(
            Sequences(
                seqs.input_ids[order],
                seqs.attention_mask[order],
                seqs.completion_mask[order],
                seqs.token_logps[order],
            ),
            self.ref_rejected_logps,
            self.ref_chosen_logps,
        )


REGIMES = ("spread", "trained", "near_ref", "at_ref")


def make_pair_batch(seed: int, regime: str, batch_size: int = 8, lengths=None) -> PairBatch:
    """A random batch of pairs; ``regime`` sets how far the policy is from the reference.

    - ``spread``: policy and reference sums drawn independently in [−200, −5] (margins up
      to ±390 nats, saturating most losses);
    - ``trained``: reference = policy + N(0, 4²) per sequence, a policy some steps into training;
    - ``near_ref``: reference = policy + N(0, 1e-3²), just off π = π_ref;
    - ``at_ref``: reference equal to the policy sums bit for bit (closed-form values).
    """
    rng = np.random.default_rng(seed)
    n = 2 * batch_size
    if lengths is None:
        lengths = rng.integers(3, 41, size=n)
    sequences = make_sequences(rng, rng.uniform(-200.0, -5.0, size=n), lengths)
    policy = sequences.logps.astype(np.float64)
    if regime == "spread":
        ref = rng.uniform(-200.0, -5.0, size=n)
    elif regime == "trained":
        ref = policy + rng.normal(0.0, 4.0, size=n)
    elif regime == "near_ref":
        ref = policy + rng.normal(0.0, 1e-3, size=n)
    elif regime == "at_ref":
        ref = policy
    else:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    ref = ref.astype(np.float32)
    return PairBatch(sequences, ref[:batch_size], ref[batch_size:])


# ------------------------------------------------------------------------------ TRL: DPO
@dataclass(frozen=True)
class TRLResult:
    loss: float
    token_grad: np.ndarray  # d loss / d token_logps, same shape as the token log-probs
    metrics: dict


def row_grad(token_grad, completion_mask) -> np.ndarray:
    """Per-row gradient with respect to the row's summed log-prob.

    Every TRL loss here depends on a row's tokens only through their sum (the SFT term through a
    batch-wide token mean), so the gradient is the same on each of the row's completion tokens;
    this reads it from the first one and checks the rest agree.
    """
    mask = np.asarray(completion_mask)[:, 1:].astype(bool)
    first = mask.argmax(axis=1)
    grad = token_grad[np.arange(len(first)), first]
    np.testing.assert_allclose(
        np.where(mask, token_grad, grad[:, None]), np.broadcast_to(grad[:, None], mask.shape)
    )
    return grad


def trl_dpo(
    batch: PairBatch,
    loss_type,
    *,
    beta: float,
    loss_weights=None,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> TRLResult:
    """``DPOTrainer._compute_loss`` on ``batch``: the mean over pairs of each ``loss_type``,
    weighted by ``loss_weights`` (TRL's default: all 1) and summed."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    seqs = batch.sequences
    token_logps = seqs.token_logps.clone().requires_grad_(True)
    model = _FusedHeadModel((seqs.input_ids, token_logps))
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": seqs.input_ids,
        "attention_mask": seqs.attention_mask,
        "completion_mask": seqs.completion_mask,
        "ref_chosen_logps": torch.from_numpy(batch.ref_chosen_logps),
        "ref_rejected_logps": torch.from_numpy(batch.ref_rejected_logps),
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    assert model.calls == 1 and loss.dtype == torch.float32
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return TRLResult(loss.item(), token_logps.grad.numpy(), metrics)


# ------------------------------------------------------------------------------ TRL: CPO
@dataclass(frozen=True)
class LogitPairBatch:
    """``B`` pairs given as logits ``[2B, T, V]`` (rows ``[chosen..., rejected...]``) and labels."""

    logits: torch.Tensor  # [2B, T, V] float32
    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T]
    labels: torch.Tensor  # [2B, T], -100 on the prompt and on padding

    @property
    def size(self) -> int:
        return self.logits.shape[0] // 2

    def _logps(self, average: bool) -> np.ndarray:
        # TRL's own reduction of logits to sequence log-probs (a staticmethod of CPOTrainer).
        logps = CPOTrainer.get_batch_logps(self.logits, self.labels, average_log_prob=average)
        return logps.detach().numpy()

    def summed(self):
        logps = self._logps(average=False)
        return logps[: self.size], logps[self.size :]

    def averaged(self):
        logps = self._logps(average=True)
        return logps[: self.size], logps[self.size :]

    @property
    def lengths(self) -> np.ndarray:
        return (self.labels[:, 1:] != -100).sum(dim=1).numpy()

    def chosen_mean_nll(self):
        return -self.averaged()[0]


def make_logit_pair_batch(seed: int, batch_size: int = 8, vocab: int = 32, lengths=None):
    """Random logits (scale 2, vocabulary 32: about −3.5 nats a token) and random labels."""
    rng = np.random.default_rng(seed)
    n = 2 * batch_size
    if lengths is None:
        lengths = rng.integers(3, 41, size=n)
    lengths = np.asarray(lengths)
    width = PROMPT_LEN + int(lengths.max())
    input_ids = rng.integers(1, vocab, size=(n, width))
    attention_mask = (np.arange(width)[None, :] < PROMPT_LEN + lengths[:, None]).astype(np.int64)
    input_ids = np.where(attention_mask == 1, input_ids, 0)
    labels = np.where(
        (np.arange(width)[None, :] >= PROMPT_LEN) & (attention_mask == 1), input_ids, -100
    )
    logits = rng.normal(0.0, 2.0, size=(n, width, vocab)).astype(np.float32)
    return LogitPairBatch(
        logits=torch.from_numpy(logits),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        labels=torch.from_numpy(labels),
    )


def trl_cpo(
    batch: LogitPairBatch,
    loss_type: str,
    *,
    beta: float,
    cpo_alpha: float,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> float:
    """``CPOTrainer.get_batch_loss_metrics``: ``mean(cpo_loss) + cpo_alpha · NLL(chosen)``."""
    b = batch.size

    def model(input_ids, attention_mask, use_cache):
        assert torch.equal(input_ids, batch.input_ids)
        return types.SimpleNamespace(logits=batch.logits)

    stub = types.SimpleNamespace(
        accelerator=_Accelerator(),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=False,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma,
        alpha=0.0,  # AlphaPO's reward shape off: plain log-prob rewards
        concatenated_inputs=CPOTrainer.concatenated_inputs,
        get_batch_logps=CPOTrainer.get_batch_logps,
    )
    stub.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, stub)
    stub.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, stub)
    inputs = {
        "chosen_input_ids": batch.input_ids[:b],
        "chosen_attention_mask": batch.attention_mask[:b],
        "chosen_labels": batch.labels[:b],
        "rejected_input_ids": batch.input_ids[b:],
        "rejected_attention_mask": batch.attention_mask[b:],
        "rejected_labels": batch.labels[b:],
    }
    loss, _ = CPOTrainer.get_batch_loss_metrics(stub, model, inputs)
    assert loss.dtype == torch.float32
    return loss.item()


# ------------------------------------------------------------------------------ TRL: KTO
@dataclass(frozen=True)
class UnpairedBatch:
    """``B`` unpaired completions with desirable labels, plus the KL (mismatched) completions."""

    sequences: Sequences  # B rows
    kl_sequences: Sequences  # B rows
    desirable: np.ndarray  # [B] bool
    ref_logps: np.ndarray  # [B] float32
    ref_kl_logps: np.ndarray  # [B] float32


def make_unpaired_batch(seed: int, desirable, *, kl_shift: float, regime: str = "trained"):
    """``kl_shift`` moves the KL completions' policy log-probs above (+) or below (−) the
    reference, which sets the sign of TRL's batch KL estimate before its clamp at 0."""
    rng = np.random.default_rng(seed)
    desirable = np.asarray(desirable, bool)
    n = len(desirable)
    sequences = make_sequences(rng, rng.uniform(-200.0, -5.0, n), rng.integers(3, 41, n))
    kl_sequences = make_sequences(
        rng, rng.uniform(-200.0, -5.0, n), rng.integers(3, 41, n), token_offset=2000
    )
    policy = sequences.logps.astype(np.float64)
    if regime == "trained":
        ref = policy + rng.normal(0.0, 4.0, n)
    elif regime == "spread":
        ref = rng.uniform(-200.0, -5.0, n)
    else:
        raise ValueError(f"unknown regime {regime!r}")
    ref_kl = kl_sequences.logps.astype(np.float64) - kl_shift + rng.normal(0.0, 2.0, n)
    return UnpairedBatch(
        sequences, kl_sequences, desirable, ref.astype(np.float32), ref_kl.astype(np.float32)
    )


@dataclass(frozen=True)
class TRLKTOResult:
    loss: float
    kl: float  # TRL's KL baseline z0, as it logs it (after the clamp at 0)
    token_grad: np.ndarray  # d loss / d token log-probs of the main completions
    kl_token_grad: np.ndarray | None  # d loss / d token log-probs of the KL completions


def trl_kto(
    batch: UnpairedBatch, *, beta: float, desirable_weight: float, undesirable_weight: float
) -> TRLKTOResult:
    """``KTOTrainer._compute_loss`` (``loss_type="kto"``) on ``batch``."""
    seqs, kl_seqs = batch.sequences, batch.kl_sequences
    token_logps = seqs.token_logps.clone().requires_grad_(True)
    kl_token_logps = kl_seqs.token_logps.clone().requires_grad_(True)
    model = _FusedHeadModel((seqs.input_ids, token_logps), (kl_seqs.input_ids, kl_token_logps))
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    inputs = {
        "input_ids": seqs.input_ids,
        "attention_mask": seqs.attention_mask,
        "completion_mask": seqs.completion_mask,
        "KL_input_ids": kl_seqs.input_ids,
        "KL_attention_mask": kl_seqs.attention_mask,
        "KL_completion_mask": kl_seqs.completion_mask,
        "label": torch.from_numpy(batch.desirable),
        "ref_logps": torch.from_numpy(batch.ref_logps),
        "ref_KL_logps": torch.from_numpy(batch.ref_kl_logps),
    }
    loss = KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    assert model.calls == 2 and loss.dtype == torch.float32
    loss.backward()
    kl_grad = None if kl_token_logps.grad is None else kl_token_logps.grad.numpy()
    return TRLKTOResult(
        loss.item(), stub._metrics["train"]["kl"][-1], token_logps.grad.numpy(), kl_grad
    )
