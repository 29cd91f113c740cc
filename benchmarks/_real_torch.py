"""The PyTorch side of ``bench_real.py``: DPO and SFT on transformers' ``LlamaForCausalLM``,
done the way TRL does them. Never imports JAX, so a worker's memory is PyTorch's alone.

Two heads:

* ``full`` -- what the issue names as TRL's default and what TRL did up to its fused head
  (``DPOTrainer.concatenated_forward`` + ``selective_log_softmax``): the model's float32
  ``[2B, T, V]`` logits for every position, the target logit gathered, a log-sum-exp over the
  full vocabulary row by row (TRL's loop to lower the peak). SFT: ``model(..., labels=...)``,
  transformers' float32 cross-entropy over every position.
* ``fused`` -- TRL 1.16's default: ``trl.trainer.utils.add_fused_lm_head`` and
  ``model(..., labels=..., fused_lm_head=True)``, which projects through the LM head in tiles
  and never builds ``[2B, T, V]`` (off GPU it still scores every position, prompt and padding
  included).

Both pad each step's rows to the longest one (TRL's ``flush_left``: rows ``prompt + completion``
right-padded), run the reference model under ``torch.no_grad``, and update with AdamW
(``weight_decay=0``) after clipping the gradient norm to 1, as TRL's defaults do.
"""

from __future__ import annotations

import os
import time

from _common import bench_config, high_water_mb, llama_config, reset_high_water, rss_mb

BETA = 0.1


def _pad(rows):
    """``ids, attention_mask, completion_mask`` ``[N, longest]`` (long) from ``(prompt,
    completion)`` id arrays, right-padded with 0."""
    import torch

    longest = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        end = len(p) + len(c)
        ids[i, :len(p)] = torch.from_numpy(p).long()
        ids[i, len(p):end] = torch.from_numpy(c).long()
        attn[i, :end] = 1
        comp[i, len(p):end] = 1
    return ids, attn, comp


def _dpo_batch(pairs):
    """TRL's concatenated ``[chosen; rejected]`` batch of one step."""
    return _pad([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs])


def _sequence_logps(model, head, ids, attn, comp):
    """Completion log-prob sums ``[N]``."""
    import torch

    labels = ids.masked_fill(comp == 0, -100)
    if head == "fused":
        out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True,
                    use_cache=False)
        return out.log_probs.sum(-1)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:, None]
    selected = torch.gather(logits, 2, targets).squeeze(2)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return ((selected - lse) * comp[:, 1:]).sum(-1)


def _models(vocab: int, head: str, with_reference: bool):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = llama_config(bench_config(vocab), pad_token_id=0)
    policy = LlamaForCausalLM(hf)
    ref = None
    if with_reference:
        ref = LlamaForCausalLM(hf)
        ref.load_state_dict(policy.state_dict())
        ref.eval().requires_grad_(False)
    if head == "fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(policy)
        if ref is not None:
            add_fused_lm_head(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    return policy, ref, opt


def _update(policy, opt, loss):
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()


def dpo_step_fn(vocab: int, head: str):
    import torch
    import torch.nn.functional as F

    policy, ref, opt = _models(vocab, head, with_reference=True)

    def step(batch):
        ids, attn, comp = batch
        with torch.no_grad():
            ref_logps = _sequence_logps(ref, head, ids, attn, comp)
        logps = _sequence_logps(policy, head, ids, attn, comp)
        pc, pr = logps.chunk(2)
        rc, rr = ref_logps.chunk(2)
        loss = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        _update(policy, opt, loss)
        return float(loss)

    return step, _dpo_batch


def sft_step_fn(vocab: int, head: str):
    policy, _, opt = _models(vocab, head, with_reference=False)

    def step(batch):
        ids, attn, comp = batch
        labels = ids.masked_fill(comp == 0, -100)
        kwargs = {"fused_lm_head": True} if head == "fused" else {}
        loss = policy(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False,
                      **kwargs).loss
        _update(policy, opt, loss)
        return float(loss)

    return step, _pad


def run(task: str, vocab: int, head: str, batches: list) -> dict:
    """Warm-up pass over ``batches`` (lists of examples), then a timed pass; memory is
    measured from the RSS once the models and the optimiser exist."""
    step, collate = (dpo_step_fn if task == "dpo" else sft_step_fn)(vocab, head)
    tensors = [collate(b) for b in batches]
    base = rss_mb()
    reset_high_water()
    first, losses = [], []
    for batch in tensors:
        start = time.perf_counter()
        losses.append(step(batch))
        first.append(time.perf_counter() - start)
    first_peak = high_water_mb() - base
    reset_high_water()
    times = []
    for batch in tensors:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    step_peak = high_water_mb() - base
    return {"times": times, "compile_s": max(sum(first) - sum(times), 0.0),
            "base_rss_mb": base, "peak_mb": max(first_peak, step_peak), "step_peak_mb": step_peak,
            "first_loss": losses[0], "padded_tokens": [int(t[0].numel()) for t in tensors]}
