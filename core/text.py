"""Text to token ids as every role sees it: queries cut to their budget, summaries and responses with EOS.

The SFT trainer, the reward-model trainer, the PPO driver, evaluation and the HTTP reward service all encode
through these functions, so a query or a (query, response) pair is the same token sequence everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from transformers import PreTrainedTokenizerBase

from rayrlhf.core.config import DataConfig
from rayrlhf.core.data import DataError, SummaryExample, TLDRData, truncate_query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedSummary:
    query_ids: list[int]
    summary_ids: list[int]  # ends with EOS


def token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], int]:
    """text -> its number of tokens (no special tokens): what `truncate_query` measures queries with."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_queries(tokenizer: PreTrainedTokenizerBase, queries: list[str], max_prompt_tokens: int) -> list[list[int]]:
    count = token_counter(tokenizer)
    texts = [truncate_query(q, count, max_prompt_tokens) for q in queries]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def with_encodable_queries(tokenizer: PreTrainedTokenizerBase, data: TLDRData, cfg: DataConfig) -> TLDRData:
    """`data` without the examples whose query cannot be cut to `data.max_prompt_tokens` (too long and not in the
    TL;DR format): skipped and counted per split, or with `data.strict` the first one is an error naming its file
    and row. Synthetic posts always fit the format, so they are not re-tokenized here."""
    if cfg.source == "synthetic":
        return data
    count = token_counter(tokenizer)
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


# Past these, a run learns little and says so (log and report): a reference cut by its budget loses its EOS
# and teaches the policy never to end; a rollout without EOS scores reward.missing_eos_score whatever it says.
REFERENCES_CUT_WARN = 0.05
BEYOND_RESPONSE_BUDGET_WARN = 0.5
NO_EOS_WARN = 0.5


def reference_budget(tokenizer: PreTrainedTokenizerBase, examples: list[SummaryExample], max_summary_tokens: int,
                     max_new_tokens: int) -> dict[str, float]:
    """How the references fit the budgets: the share whose tokens plus EOS exceed data.max_summary_tokens (cut,
    EOS lost) and rollout.max_new_tokens (a policy imitating them cannot end in time), and their median length."""
    encoded = tokenizer([e.reference for e in examples], add_special_tokens=False)["input_ids"]
    lengths = sorted(len(ids) + 1 for ids in encoded)
    n = max(1, len(lengths))
    return {"sft/references_cut_fraction": sum(x > max_summary_tokens for x in lengths) / n,
            "sft/references_beyond_response_budget": sum(x > max_new_tokens for x in lengths) / n,
            "sft/reference_tokens_median": float(lengths[len(lengths) // 2]) if lengths else 0.0}


def budget_warnings(metrics: dict[str, float]) -> list[str]:
    """Plain-words warnings for the budget figures in `metrics` (SFT's reference_budget, PPO's EOS share)."""
    out = []
    if metrics.get("sft/references_cut_fraction", 0.0) > REFERENCES_CUT_WARN:
        out.append(f"{metrics['sft/references_cut_fraction']:.0%} of the SFT references (with EOS) exceed "
                   f"data.max_summary_tokens and are cut without their EOS (median "
                   f"{metrics.get('sft/reference_tokens_median', 0):.0f} tokens): raise data.max_summary_tokens")
    if metrics.get("sft/references_beyond_response_budget", 0.0) > BEYOND_RESPONSE_BUDGET_WARN:
        out.append(f"{metrics['sft/references_beyond_response_budget']:.0%} of the SFT references (with EOS) are "
                   f"longer than rollout.max_new_tokens: most rollouts will end without EOS; raise it")
    if "ppo/eos_fraction_mean" in metrics and metrics["ppo/eos_fraction_mean"] < NO_EOS_WARN:
        out.append(f"{1 - metrics['ppo/eos_fraction_mean']:.0%} of the PPO rollouts ended without EOS, so they scored "
                   f"reward.missing_eos_score whatever they said: raise rollout.max_new_tokens")
    return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge_score, stemmed), as the TL;DR papers report them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for k, s in scorer.score(r, p).items():
            totals[k] += s.fmeasure
    return {k: v / max(1, len(predictions)) for k, v in totals.items()}
