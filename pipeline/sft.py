"""Supervised fine-tuning: cross-entropy on the summary tokens only, the query masked out.

`SFTTrainer` is a plain class (the Ray actor in `actors/stages.py` only hosts it). It keeps the checkpoint
with the best validation loss and reports ROUGE-1/2/L of greedy summaries next to the lead-sentence baseline.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from pipeline.checkpoints import CheckpointDir, resume_or_start, save_training_state
from pipeline.config import Config
from pipeline.data import SummaryExample, TLDRData, corpus_text, lead_baseline, load_tldr, truncate_query
from pipeline.metrics import MetricsLogger
from pipeline.modeling import (
    apply_lora, build_tiny_llama, count_params, load_causal_lm, load_tokenizer, save_checkpoint, train_tokenizer,
)
from pipeline.sequences import pad_left, pad_right, sample
from pipeline.synthetic import judge

log = logging.getLogger(__name__)
IGNORE = -100


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Example indices of each optimizer step from `start_step` on (the last partial batch of an epoch dropped).
    An epoch's order is a function of (seed, epoch) only, so a step number is a complete data cursor."""
    per_epoch = n // batch_size
    for epoch in range(start_step // per_epoch, epochs):
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        for b in range(max(0, start_step - epoch * per_epoch), per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def sft_batch(items: list[EncodedSummary], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask (B, T) and labels with the query and padding set to -100."""
    ids, mask = pad_right([e.query_ids + e.summary_ids for e in items], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(items):
        q = len(e.query_ids)
        labels[i, q : q + len(e.summary_ids)] = ids[i, q : q + len(e.summary_ids)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over the unmasked labels, and how many tokens that was.

    Summing (not averaging) per micro-batch makes gradient accumulation exact: the caller divides by
    the token count of the whole optimizer batch.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for k, s in scorer.score(r, p).items():
            totals[k] += s.fmeasure
    return {k: v / max(1, len(predictions)) for k, v in totals.items()}


@torch.no_grad()
def generate_summaries(model, tokenizer, query_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                       temperature: float = 1.0, greedy: bool = True) -> list[str]:
    model.eval()
    out = []
    for i in range(0, len(query_ids), batch_size):
        prompts, mask = pad_left(query_ids[i : i + batch_size], tokenizer.pad_token_id)
        responses, rmask = sample(model, prompts, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=1.0, greedy=greedy)
        out += tokenizer.batch_decode(responses.masked_fill(rmask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return out


def init_policy(cfg: Config, data: TLDRData) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The base policy: the builtin tiny Llama with a tokenizer trained on the corpus, or a hub/local model."""
    if cfg.model.is_builtin:
        tokenizer = train_tokenizer(corpus_text(data), cfg.model.vocab_size) if cfg.model.tokenizer is None \
            else load_tokenizer(cfg.model.tokenizer)
        return build_tiny_llama(cfg.model, tokenizer), tokenizer
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    return load_causal_lm(cfg.model.name_or_path, tokenizer, cfg.model.dtype), tokenizer


class SFTTrainer:
    """Trains the SFT policy; `run()` writes `<out_dir>/checkpoint` (best validation loss) and returns a summary."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False):
        self.cfg, self.out_dir, self.resume = cfg, Path(out_dir), resume

    def run(self) -> dict[str, float]:
        cfg, sc = self.cfg, self.cfg.sft
        seed_everything(cfg.run.seed)
        t0 = time.time()
        data = load_tldr(cfg.data)
        model, tok = init_policy(cfg, data)
        model = apply_lora(model, cfg.model.lora, "CAUSAL_LM")
        log.info("SFT: %d parameters, %d train / %d valid examples", count_params(model), len(data.sft_train),
                 len(data.sft_valid))
        enc = lambda ex: encode_summaries(tok, ex, cfg.data.max_prompt_tokens, cfg.data.max_summary_tokens)  # noqa: E731
        train, valid = enc(data.sft_train), enc(data.sft_valid)
        eval_examples = data.sft_valid[: sc.num_eval_prompts]
        eval_queries = [e.query_ids for e in valid[: sc.num_eval_prompts]]

        steps_per_epoch = len(train) // sc.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"sft.batch_size {sc.batch_size} exceeds the {len(train)} training examples")
        total = steps_per_epoch * sc.epochs
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sc.lr,
                                weight_decay=sc.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(sc.warmup_ratio * total), total)
        best = {"sft/valid_loss": float("inf")}
        ckpts = CheckpointDir(self.out_dir / "checkpoints", cfg.run.keep_checkpoints)
        step, best = resume_or_start(ckpts, self.resume, self.out_dir, model, opt, sched, best)
        metrics = MetricsLogger(self.out_dir)
        bar = tqdm(total=total, initial=step, desc="sft", mininterval=2, ascii=True)
        for idx in epoch_batches(len(train), sc.batch_size, sc.epochs, cfg.run.seed, step):
            model.train()
            micro = [sft_batch([train[i] for i in idx[m : m + sc.micro_batch_size]], tok.pad_token_id)
                     for m in range(0, len(idx), sc.micro_batch_size)]
            n_tokens = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro)
            loss_sum = 0.0
            for mb in micro:
                loss, _ = sft_loss(model, mb)
                (loss / n_tokens).backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            metrics.log(step, {"sft/loss": loss_sum / n_tokens, "sft/grad_norm": float(grad_norm),
                               "sft/lr": sched.get_last_lr()[0]})
            if step % sc.eval_every == 0 or step == total:
                result = self.evaluate(model, tok, valid, eval_examples, eval_queries)
                metrics.log(step, result)
                bar.set_postfix(valid_loss=f"{result['sft/valid_loss']:.3f}", rougeL=f"{result['sft/rougeL']:.3f}")
                if result["sft/valid_loss"] < best["sft/valid_loss"]:
                    best = {**result, "sft/best_step": step}
                    save_checkpoint(model, tok, self.out_dir / "checkpoint")
                save_training_state(ckpts, step, model, opt, sched, best)
        bar.close()
        baseline = rouge([lead_baseline(e.query) for e in eval_examples], [e.reference for e in eval_examples])
        best.update({f"sft/lead_{k}": v for k, v in baseline.items()})
        if eval_examples[0].post is not None:
            best["sft/lead_gold_score"] = float(np.mean([judge(e.post, lead_baseline(e.query)).score for e in eval_examples]))
        best["timing/sft_s"] = time.time() - t0
        metrics.log(step, best)
        metrics.close()
        return best

    @torch.no_grad()
    def evaluate(self, model, tok, valid: list[EncodedSummary], examples: list[SummaryExample],
                 queries: list[list[int]]) -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(valid), self.cfg.sft.micro_batch_size):
            loss, n = sft_loss(model, sft_batch(valid[i : i + self.cfg.sft.micro_batch_size], tok.pad_token_id))
            total, count = total + loss.item(), count + n
        summaries = generate_summaries(model, tok, queries, self.cfg.data.max_summary_tokens, self.cfg.eval.batch_size)
        result = {"sft/valid_loss": total / count}
        result.update({f"sft/{k}": v for k, v in rouge(summaries, [e.reference for e in examples]).items()})
        if examples[0].post is not None:
            result["sft/gold_score"] = float(np.mean([judge(e.post, s).score for e, s in zip(examples, summaries)]))
        return result
