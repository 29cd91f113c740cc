"""What every demo stage shares: the run :class:`Context`, the progress bar and the readers of
earlier stages' files.

The stage modules (:mod:`~jaxalign.demo.pipeline`, :mod:`~jaxalign.demo.align`,
:mod:`~jaxalign.demo.ai_feedback`, :mod:`~jaxalign.demo.report`) take these from here rather
than from :mod:`~jaxalign.demo.pipeline` (which imports them all), so the demo's imports run
one way (an arrow points at the importer)::

    context → align → ai_feedback, report → pipeline → __main__

(``ai_feedback`` also imports ``context`` directly; ``tests/test_demo_imports.py`` checks that
no import closes a cycle.)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxalign.data import DataConfig, load_jsonl
from jaxalign.demo.cache import StageCache, load_params
from jaxalign.demo.config import DemoConfig
from jaxalign.evaluate import sample_completions
from jaxalign.models import CausalLM
from jaxalign.tokenizer import Tokenizer

__all__ = ["Context", "RunContext", "preference_dataset", "progress", "read_jsonl"]


def progress(iterable=None, **kwargs) -> tqdm:
    """The demo's progress bar (stderr, refreshed at most once a second)."""
    return tqdm(iterable, file=sys.stderr, mininterval=1.0, dynamic_ncols=True, **kwargs)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class RunContext:
    """What a demo's later stages need from earlier ones (filled in as the run goes): its
    config, the stage cache, and the tokenizer and model once they are built."""

    config: Any
    cache: StageCache
    tokenizer: Tokenizer | None = None
    model: CausalLM | None = None

    @property
    def out(self) -> Path:
        return self.cache.out


@dataclasses.dataclass
class Context(RunContext):
    """The sentiment demo's run context (its stages' shared readers)."""

    config: DemoConfig

    def data_config(self) -> DataConfig:
        """Fixed shapes: every batch is ``[B, max_len]`` (prompts ``[B, prompt_len]``)."""
        cfg = self.config
        return DataConfig(max_length=cfg.max_len, max_prompt_length=cfg.prompt_len,
                          pad_to_max=True)

    def prompts(self, name: str) -> dict[str, np.ndarray]:
        """All prompts of ``OUT/prompts/NAME.jsonl`` as one left-padded batch."""
        dataset = load_jsonl(self.out / "prompts" / f"{name}.jsonl", self.tokenizer, kind="prompt",
                             config=self.data_config())
        return dataset.collate(np.arange(len(dataset)))

    def decode(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
        return self.tokenizer.decode_batch(tokens, attention_mask=mask)

    def finished(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``[N]`` bool: the completion ended with EOS (rather than hitting the length limit)."""
        return np.any((tokens == self.tokenizer.eos_id) & (mask > 0), axis=1)

    def sft_params(self) -> Any:
        return load_params(self.out / "sft" / "params.msgpack")

    def reward_params(self) -> Any:
        """The reward model's (trained on the gold-labelled train pairs)."""
        return load_params(self.out / "reward_model" / "params.msgpack")

    def sample(self, params: Any, prompts: dict[str, np.ndarray], key: jax.Array):
        cfg = self.config
        return sample_completions(
            self.model, params, prompts["prompt_ids"], prompts["prompt_mask"], key,
            max_new_tokens=cfg.max_new_tokens, eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.padding_id, batch_size=cfg.gen_batch)


def preference_dataset(ctx: Context, split: str, *, stage: str = "preferences"):
    """``OUT/STAGE/SPLIT.jsonl`` (gold-labelled pairs, or ``rlaif_labels``) as a dataset."""
    return load_jsonl(ctx.out / stage / f"{split}.jsonl", ctx.tokenizer,
                      kind="preference", config=ctx.data_config())
