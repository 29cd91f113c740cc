"""JSONL data in the formats TRL users already have, tokenised into fixed-shape numpy batches.

Record kinds (one JSON object per line; blank lines are ignored; extra fields are ignored):

    preference  {"prompt", "chosen", "rejected"}  + optional "margin" (number, default 0)
                                                  + optional "p_chosen" (soft label in [0, 1], default 1)
    ranking     {"prompt", "responses": [K], "ranking": [K ints]}   ranking[i] = rank of
                responses[i], 0 best, equal ranks = ties; K must be the same in the whole file
    sft         {"prompt", "completion"}
    unpaired    {"prompt", "completion", "label": true | false}     KTO/BCO: a desirable (true) or
                                                                    undesirable (false) completion
    prompt      {"prompt"}                                          prompts for RLHF generation

Each text field is a string, or (conversational records) a list of `{"role", "content"}`
messages: the prompt is the conversation so far, rendered with the tokenizer's chat template
(`Tokenizer.apply_chat_template(..., add_generation_prompt=True)`; the plain `<|role|>` format
without one); a completion is the turn(s) that follow. An sft record may instead be TRL's
`{"messages": [...]}`: the prompt is everything before the first assistant message.
Conversational completions train on their **assistant turns only** (multi-turn included): the
mask comes from rendering prefixes (`jaxalign.conversation`), and a conversation whose
rendering is not prefix-stable is a bad record. With a chat template the ids are the
template's own (`transformers`' `apply_chat_template`), so `add_bos`/`add_eos` do not apply.
A record may not mix the two styles.

A sequence is `[BOS] prompt completion [EOS]` (BOS/EOS only where the tokenizer has them and
`DataConfig.add_bos` / `add_eos` ask for them). Truncation: the prompt keeps its *end*
(`max_prompt_length`, BOS kept), then the completion keeps its *start* so that the sequence
fits `max_length` (a cut completion loses its EOS, as it did not finish).

Batches (numpy; ids and masks int32, `L` = the batch's length bucket, see `bucket_length`):

    preference  chosen_ids, chosen_attention_mask, chosen_completion_mask          [B, L]
                rejected_ids, rejected_attention_mask, rejected_completion_mask    [B, L]
                margin [B] float32, p_chosen [B] float32
    ranking     ids, attention_mask, completion_mask [B, K, L]; ranks [B, K] int32
    sft         input_ids, attention_mask, completion_mask [B, L]
    unpaired    input_ids, attention_mask, completion_mask [B, L]; desirable [B] float32 (1/0);
                kl_input_ids, kl_attention_mask, kl_completion_mask [B, L]: row i's prompt with
                row (i + 1) mod B's completion (the mismatched pairs KTO estimates its KL
                baseline from, as TRL builds them; the completion cut to fit max_length)
    prompt      prompt_ids, prompt_mask [B, P]   (LEFT-padded, ready for generation)

Sequences are right-padded; `attention_mask` is 1 on real tokens, `completion_mask` 1 on
completion tokens (EOS included) and 0 on prompt and padding.

Packed batches (`PackingConfig.packing` "pairs" for preference data, "sequences" for sft; one
fixed shape `PackSpec`, several records per row, shared prompts for pairs) come from
`PackedLoader`; the keys are in `_packing.py`'s docstring.

Files: `_types.py` (kinds, errors, settings, report), `_records.py` (one record checked and
tokenised), `_dataset.py` (batches and the JSONL reader), `_loader.py` (batch orders),
`_packing.py` (packed batches), `_packed_loader.py` (their order).

Bad records raise `DataError("{path}:{line}: {reason}")` while loading (`on_bad_record="error"`)
or are skipped and counted in the `DataReport` (`"skip"`). `DataLoader` gives batch `step` as a
pure function of `(seed, step)`, so resuming from `state()` replays exactly the same batches.
"""

from jaxalign.data._dataset import Dataset, load_jsonl, read_records
from jaxalign.data._loader import DataLoader, ShardedLoader, shard_lines
from jaxalign.data._packed_loader import (
    PackedLoader, PackingConfig, PackingReport, PackSpec, ShardedPackedLoader, pad_pairs,
)
from jaxalign.data._types import (
    RECORD_KINDS,
    BadRecord,
    DataConfig,
    DataError,
    DataReport,
    Example,
    bucket_length,
    detect_file_kind,
    detect_kind,
)

__all__ = [
    "RECORD_KINDS", "BadRecord", "DataConfig", "DataError", "DataLoader", "DataReport",
    "Dataset", "Example", "PackSpec", "PackedLoader", "PackingConfig", "PackingReport",
    "ShardedLoader", "ShardedPackedLoader", "bucket_length", "detect_file_kind", "detect_kind", "load_jsonl",
    "pad_pairs", "read_records", "shard_lines",
]
