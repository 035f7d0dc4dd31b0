"""Scores for {prompt, response} texts, tokenized exactly as the reward model was trained. No Ray, no HTTP.

`TextRewardModel.encode` applies the text policy documented in `serving.api` and returns token sequences
(query tokens + response tokens + EOS, as `core.text.encode_responses` builds them); `score_sequences`
runs the model on them (blocking; the service calls it from its model thread).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.roles.reward import RewardScorer
from rayrlhf.core.config import DataConfig
from rayrlhf.core.data import DataError, truncate_query
from rayrlhf.core.text import token_counter

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class TextPolicyError(ValueError):
    """An item the reward model cannot score as sent; the message names the item and the limit."""


def checkpoint_version(checkpoint: str | Path) -> str:
    """A stable id of the weights: the first 12 hex digits of sha256 over the weight files, in name order.

    For the usual single `model.safetensors` this is sha256(model.safetensors)[:12]; sharded checkpoints
    hash their shards one after another. The same weights copied elsewhere keep the same version.
    """
    root = Path(checkpoint)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in checkpoint {root}")
    h = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class EncodedItems:
    """Token sequences ready for the model (query + response + EOS, cut to their budgets), one per item."""

    sequences: list[list[int]]
    truncated: list[bool]  # the response (with EOS) exceeded max_summary_tokens and was cut


class TextRewardModel:
    """`RewardScorer` for texts: the service's model, and the in-process baseline the tests and benchmark use."""

    def __init__(self, checkpoint: str | Path, data: DataConfig, batch_size: int, dtype: str = "float32"):
        if not (Path(checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"reward-model checkpoint not found at {checkpoint} (no config.json)")
        # missing_eos_score=None: the service returns the model's score; the EOS trick is the PPO client's,
        # which knows whether the policy emitted EOS (a text does not say).
        self.scorer = RewardScorer(str(checkpoint), missing_eos_score=None, batch_size=batch_size, dtype=dtype)
        self.tokenizer = self.scorer.tokenizer
        self.checkpoint = self.scorer.checkpoint
        self.version = checkpoint_version(checkpoint)
        self.max_prompt_tokens, self.max_summary_tokens = data.max_prompt_tokens, data.max_summary_tokens
        if self.max_prompt_tokens + self.max_summary_tokens > self.scorer.max_length:
            raise ValueError(f"data.max_prompt_tokens + data.max_summary_tokens ({self.max_prompt_tokens} + "
                             f"{self.max_summary_tokens}) exceed the reward model's {self.scorer.max_length} positions")

    @property
    def reward_bias(self) -> float:
        return self.scorer.bias

    def encode(self, prompts: list[str], responses: list[str], truncate_responses: bool = False) -> EncodedItems:
        """The text policy of `serving.api`; raises TextPolicyError naming the first item that breaks it."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return EncodedItems([], [])
        tok, eos, count = self.tokenizer, self.tokenizer.eos_token_id, token_counter(self.tokenizer)
        queries = []
        for i, prompt in enumerate(prompts):
            try:
                queries.append(truncate_query(prompt, count, self.max_prompt_tokens))
            except DataError as e:
                raise TextPolicyError(f"items[{i}].prompt: {e}") from None
        q_ids = tok(queries, add_special_tokens=False)["input_ids"]
        r_ids = tok(responses, add_special_tokens=False)["input_ids"]
        sequences, truncated = [], []
        for i, (q, r) in enumerate(zip(q_ids, r_ids)):
            cut = len(r) + 1 > self.max_summary_tokens
            if cut and not truncate_responses:
                raise TextPolicyError(
                    f"items[{i}].response has {len(r)} tokens; the reward model scores at most "
                    f"{self.max_summary_tokens - 1} (data.max_summary_tokens={self.max_summary_tokens} including EOS). "
                    "Shorten it, or set truncate_responses to cut it as training did.")
            sequences.append(q + (r + [eos])[: self.max_summary_tokens])
            truncated.append(cut)
        return EncodedItems(sequences, truncated)

    def score_sequences(self, sequences: list[list[int]]) -> list[float]:
        """Blocking model call: scores (bias included) of whole token sequences."""
        return self.scorer.score_token_ids(sequences)

    def score_texts(self, prompts: list[str], responses: list[str], truncate_responses: bool = False) -> list[float]:
        return self.score_sequences(self.encode(prompts, responses, truncate_responses).sequences)
