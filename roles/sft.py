"""Supervised fine-tuning: cross-entropy on the summary tokens only, the query masked out.

`SFTTrainer` is a plain class (the Ray actor `actors.SFTStage` only hosts it). It keeps the checkpoint
with the best validation loss and reports ROUGE-1/2/L of greedy summaries next to the lead-sentence baseline.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rayrlhf.core.config import Config, package_path
from rayrlhf.core.data import SummaryExample, TLDRData, corpus_text, lead_baseline, load_tldr
from rayrlhf.core.metrics import MetricsLogger, NoMetrics
from rayrlhf.core.modeling import (
    build_tiny_llama, convert_gguf, count_params, load_causal_lm, load_tokenizer, train_tokenizer,
)
from rayrlhf.core.forward import model_device, response_logits
from rayrlhf.core.padding import pad_left, pad_right
from rayrlhf.core.plan import micro_batch_groups, sequence_work
from rayrlhf.core.sampling import sample
from rayrlhf.core.sharding import TrainGroup
from rayrlhf.core.synthetic import judge
from rayrlhf.core.text import (
    EncodedSummary, budget_warnings, encode_summaries, reference_budget, rouge, with_encodable_queries,
)
from rayrlhf.core.training import (
    TrainingStart, epoch_batches, keep_best, optimizer_step, prepare_model, seed_everything, start_training,
)
from rayrlhf.core.work import WorkMeter

log = logging.getLogger(__name__)
IGNORE = -100


def sft_batch(items: list[EncodedSummary], pad_id: int) -> dict[str, torch.Tensor]:
    """Queries left-padded, summaries right-padded after them, as in rollouts: input_ids/attention_mask (B, Q+S)
    and labels (B, S), the summary tokens with padding set to -100. The summaries take the last S positions, so
    only those positions' logits are computed (`sft_loss`)."""
    queries, qmask = pad_left([e.query_ids for e in items], pad_id)
    summaries, smask = pad_right([e.summary_ids for e in items], pad_id)
    return {"input_ids": torch.cat([queries, summaries], 1), "attention_mask": torch.cat([qmask, smask], 1),
            "labels": summaries.masked_fill(smask == 0, IGNORE)}


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool = False) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over the unmasked labels, and how many tokens that was.

    Summing (not averaging) per micro-batch makes gradient accumulation exact: the caller divides by
    the token count of the whole optimizer batch. Only the logits that predict summary tokens go through the
    LM head (`response_logits`): on SmolLM2 (49k vocabulary) that makes a LoRA step 1.6x faster. `packed`:
    the forward runs on the real tokens only (`padding.pack`).
    """
    batch = {k: v.to(model_device(model)) for k, v in batch.items()}
    labels = batch["labels"]
    logits = response_logits(model, batch["input_ids"], batch["attention_mask"], labels.shape[1], packed)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def generate_summaries(model, tokenizer, query_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                       temperature: float = 1.0, greedy: bool = True) -> list[str]:
    model.eval()
    out = []
    for i in range(0, len(query_ids), batch_size):
        prompts, mask = pad_left(query_ids[i : i + batch_size], tokenizer.pad_token_id)
        prompts, mask = prompts.to(model_device(model)), mask.to(model_device(model))
        responses, rmask = sample(model, prompts, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=1.0, greedy=greedy)
        responses = responses.masked_fill(rmask == 0, tokenizer.pad_token_id).cpu()
        out += tokenizer.batch_decode(responses, skip_special_tokens=True)
    return out


def init_policy(cfg: Config, data: TLDRData, run_dir: Path,
                group: TrainGroup = TrainGroup()) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The base policy: the builtin tiny Llama with a tokenizer trained on the corpus, a hub/local model, or a
    GGUF file converted once into `<run_dir>/base_model`. In a group rank 0 trains the tokenizer and converts the
    GGUF file; the other ranks take its tokenizer and folder (every rank builds the same weights: same seed)."""
    if cfg.model.is_builtin:
        tokenizer = None
        if group.leader:
            tokenizer = train_tokenizer(corpus_text(data), cfg.model.vocab_size) if cfg.model.tokenizer is None \
                else load_tokenizer(cfg.model.tokenizer)
        tokenizer = group.broadcast(tokenizer)
        return build_tiny_llama(cfg.model, tokenizer), tokenizer
    base = package_path(cfg.model.name_or_path)
    if cfg.model.gguf is not None:
        if group.leader:
            convert_gguf(*cfg.model.gguf, run_dir / "base_model")
        group.barrier()
        base = str(run_dir / "base_model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or base)
    return load_causal_lm(base, tokenizer, cfg.model.dtype), tokenizer


class SFTTrainer:
    """Trains the SFT policy; `run()` writes `<out_dir>/checkpoint` (best validation loss) and returns a summary.

    Run by every rank of a group (`sft.workers`, the process group already joined): the model is sharded with
    FSDP2, each rank trains on its token-balanced share of every batch with the loss divided by the whole batch's
    token count (so the summed gradients are the one-process gradient), validates in step with the others, and
    rank 0 alone writes metrics and checkpoints' small state."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False):
        self.cfg, self.out_dir, self.resume = cfg, Path(out_dir), resume

    def run(self) -> dict[str, float]:
        cfg, sc = self.cfg, self.cfg.sft
        seed_everything(cfg.run.seed)
        t0 = time.time()
        group = TrainGroup.start(cfg.model.mixed_precision, cfg.ray.startup_timeout_s)
        data = load_tldr(cfg.data)
        model, tok = init_policy(cfg, data, self.out_dir.parent, group)
        data = with_encodable_queries(tok, data, cfg.data)
        model = self._trainable(model, group)
        log.info("SFT: %d parameters, %d train / %d valid examples%s", count_params(model), len(data.sft_train),
                 len(data.sft_valid), f", rank {group.rank.rank} of {group.rank.world}" if group.fsdp else "")
        budget = reference_budget(tok, data.sft_train, cfg.data.max_summary_tokens, cfg.rollout.max_new_tokens)
        for warning in budget_warnings(budget) if group.leader else ():
            log.warning("budgets: %s", warning)
        enc = lambda ex: encode_summaries(tok, ex, cfg.data.max_prompt_tokens, cfg.data.max_summary_tokens)  # noqa: E731
        train, valid = enc(data.sft_train), enc(data.sft_valid)
        eval_examples = data.sft_valid[: sc.num_eval_prompts]
        eval_queries = [e.query_ids for e in valid[: sc.num_eval_prompts]]
        training = start_training(model, sc, len(train), "examples", self.out_dir, cfg.run.keep_checkpoints,
                                  self.resume, {"sft/valid_loss": float("inf")}, group)
        step, best = training.step, training.best
        metrics = MetricsLogger(self.out_dir, cfg=cfg) if group.leader else NoMetrics()
        bar = tqdm(total=training.total_steps, initial=step, desc="sft", mininterval=2, ascii=True,
                   disable=not group.leader)
        for idx in epoch_batches(len(train), sc.batch_size, sc.epochs, cfg.run.seed, step):
            row = self._train_step(model, training, [train[i] for i in idx], tok.pad_token_id, group)
            step += 1
            bar.update(1)
            metrics.log(step, row)
            if step % sc.eval_every == 0 or step == training.total_steps:
                result = self.evaluate(model, tok, valid, eval_examples, eval_queries)
                metrics.log(step, result)
                bar.set_postfix(valid_loss=f"{result['sft/valid_loss']:.3f}", rougeL=f"{result['sft/rougeL']:.3f}")
                best = keep_best(step, result, best, "sft/valid_loss", False, model, tok, self.out_dir, training,
                                 group)
        bar.close()
        best.update(self._baselines(eval_examples))
        best.update(budget)
        best["timing/sft_s"] = time.time() - t0
        metrics.log(step, best)
        metrics.close()
        return best

    def _trainable(self, model, group: TrainGroup):
        """The base policy trainable as the config says (LoRA or full), sharded in a group; the plan its examples
        are cut by."""
        model, self.plan, self.cost = prepare_model(model, self.cfg.model, self.cfg.sft, group)
        return model

    def _train_step(self, model, training: TrainingStart, batch: list[EncodedSummary], pad_id: int,
                    group: TrainGroup) -> dict[str, float]:
        """One optimizer step on `batch` (this rank's token-balanced share of it) -> the step's metrics."""
        model.train()
        meter = WorkMeter(next(model.parameters()).device, self.cfg.model.train_compute_dtype)
        lengths = [len(e.query_ids) + len(e.summary_ids) for e in batch]
        n_tokens = sum(len(e.summary_ids) for e in batch)  # the label tokens of the whole batch
        mine = group.share(lengths)
        loss_sum = 0.0
        for g in self.plan.groups([lengths[j] for j in mine]):
            items = [batch[mine[j]] for j in g]
            loss, n = sft_loss(model, sft_batch(items, pad_id), self.plan.packed)
            (loss / n_tokens).backward()
            loss_sum += loss.item()
            ran = [lengths[mine[j]] for j in g]  # the head runs on the summaries' positions only, never recomputed
            meter.train(self.cost, *sequence_work(model.config, ran), n, self.cfg.model.gradient_checkpointing)
        grad_norm = optimizer_step(model, training.opt, training.sched, self.cfg.sft.max_grad_norm)
        loss_sum = group.sum({"loss": loss_sum})["loss"]
        work = meter.stop(sum(lengths))
        return {"sft/loss": loss_sum / n_tokens, "sft/grad_norm": grad_norm, "sft/lr": training.sched.get_last_lr()[0],
                "sft/tokens_per_s": work.tokens_per_s, "sft/mfu": work.mfu}

    def _baselines(self, examples: list[SummaryExample]) -> dict[str, float]:
        """ROUGE (and, on the synthetic task, the gold score) of the lead-sentence baseline on the eval posts."""
        leads = [lead_baseline(e.query) for e in examples]
        out = {f"sft/lead_{k}": v for k, v in rouge(leads, [e.reference for e in examples]).items()}
        if examples[0].post is not None:
            out["sft/lead_gold_score"] = float(np.mean([judge(e.post, lead).score for e, lead in zip(examples, leads)]))
        return out

    @torch.no_grad()
    def evaluate(self, model, tok, valid: list[EncodedSummary], examples: list[SummaryExample],
                 queries: list[list[int]]) -> dict[str, float]:
        model.eval()
        sc = self.cfg.sft
        total, count = 0.0, 0
        lengths = [len(e.query_ids) + len(e.summary_ids) for e in valid]
        for group in micro_batch_groups(lengths, sc.micro_batch_size, sc.max_tokens_per_micro_batch):
            batch = sft_batch([valid[i] for i in group], tok.pad_token_id)
            loss, n = sft_loss(model, batch, sc.max_tokens_per_micro_batch is not None)
            total, count = total + loss.item(), count + n
        summaries = generate_summaries(model, tok, queries, self.cfg.data.max_summary_tokens, self.cfg.eval.batch_size)
        result = {"sft/valid_loss": total / count}
        result.update({f"sft/{k}": v for k, v in rouge(summaries, [e.reference for e in examples]).items()})
        if examples[0].post is not None:
            result["sft/gold_score"] = float(np.mean([judge(e.post, s).score for e, s in zip(examples, summaries)]))
        return result
