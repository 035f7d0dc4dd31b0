"""Text to token ids as every role sees it: queries cut to their budget, summaries and responses with EOS.

The SFT trainer, the reward-model trainer, the PPO driver, evaluation and the HTTP reward service all encode
through these functions, so a query or a (query, response) pair is the same token sequence everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from core.data import SummaryExample, truncate_query


@dataclass(frozen=True)
class EncodedSummary:
    query_ids: list[int]
    summary_ids: list[int]  # ends with EOS


def encode_queries(tokenizer: PreTrainedTokenizerBase, queries: list[str], max_prompt_tokens: int) -> list[list[int]]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = [truncate_query(q, count, max_prompt_tokens) for q in queries]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


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
