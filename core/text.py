"""Text to token ids as every role sees it: queries cut to their budget, summaries and responses with EOS.

The SFT trainer, the reward-model trainer, the PPO driver, evaluation and the HTTP reward service all encode
through these functions, so a query or a (query, response) pair is the same token sequence everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

from transformers import PreTrainedTokenizerBase

from core.config import DataConfig
from core.data import DataError, SummaryExample, TLDRData, truncate_query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedSummary:
    query_ids: list[int]
    summary_ids: list[int]  # ends with EOS


def encode_queries(tokenizer: PreTrainedTokenizerBase, queries: list[str], max_prompt_tokens: int) -> list[list[int]]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = [truncate_query(q, count, max_prompt_tokens) for q in queries]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def with_encodable_queries(tokenizer: PreTrainedTokenizerBase, data: TLDRData, cfg: DataConfig) -> TLDRData:
    """`data` without the examples whose query cannot be cut to `data.max_prompt_tokens` (too long and not in the
    TL;DR format): skipped and counted per split, or with `data.strict` the first one is an error naming its file
    and row. Synthetic posts always fit the format, so they are not re-tokenized here."""
    if cfg.source == "synthetic":
        return data

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept = {}
    for split in fields(data):
        examples, bad, first = [], 0, None
        for ex in getattr(data, split.name):
            try:
                truncate_query(ex.query, count, cfg.max_prompt_tokens)
            except DataError as e:
                if cfg.strict:
                    raise DataError(f"{ex.id}: {e}") from None
                bad, first = bad + 1, first or f"{ex.id}: {e}"
                continue
            examples.append(ex)
        if bad:
            log.warning("%s: skipped %d of %d rows whose query cannot be cut to data.max_prompt_tokens; first: %s",
                        split.name, bad, bad + len(examples), first)
        if bad and not examples:
            raise DataError(f"{split.name}: no query fits data.max_prompt_tokens={cfg.max_prompt_tokens}")
        kept[split.name] = examples
    return replace(data, **kept)


def encode_summaries(tokenizer: PreTrainedTokenizerBase, examples: list[SummaryExample], max_prompt_tokens: int,
                     max_summary_tokens: int) -> list[EncodedSummary]:
    """Truncated query tokens; summary tokens with EOS appended (detail 2), cut to the summary budget."""
    queries = encode_queries(tokenizer, [e.query for e in examples], max_prompt_tokens)
    summaries = tokenizer([e.reference for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [EncodedSummary(q, (s + [eos])[:max_summary_tokens]) for q, s in zip(queries, summaries)]


def encode_responses(tokenizer: PreTrainedTokenizerBase, queries: list[str], responses: list[str],
                     max_prompt_tokens: int, max_summary_tokens: int) -> list[list[int]]:
    """query tokens + response tokens + EOS, each part cut to its budget: what the scorer sees."""
    q_ids = encode_queries(tokenizer, queries, max_prompt_tokens)
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [q + (r + [eos])[:max_summary_tokens] for q, r in zip(q_ids, r_ids)]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge_score, stemmed), as the TL;DR papers report them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for k, s in scorer.score(r, p).items():
            totals[k] += s.fmeasure
    return {k: v / max(1, len(predictions)) for k, v in totals.items()}
