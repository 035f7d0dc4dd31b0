"""Reward-model training on comparisons: loss = -log sigmoid(r_chosen - r_rejected).

Initialised from the SFT checkpoint with a fresh scalar head (std 1/sqrt(d+1)); the reward is read at the
last non-pad token. After training, a bias is set so reference summaries score 0 on average (detail 7).
On the synthetic task, accuracy is also measured against the noiseless gold labels, next to the ceiling the
label noise implies for the noisy labels.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rayrlhf.core.config import Config
from rayrlhf.core.data import ComparisonExample, SummaryExample, load_tldr
from rayrlhf.core.metrics import MetricsLogger, NoMetrics
from rayrlhf.core.modeling import count_params, load_scalar_model, load_tokenizer, save_checkpoint
from rayrlhf.core.forward import model_device, sequence_scores
from rayrlhf.core.padding import pad_right
from rayrlhf.core.pairs import pair_scores, pair_work
from rayrlhf.core.plan import may_share_prefix, micro_batch_groups
from rayrlhf.core.sharding import TrainGroup
from rayrlhf.core.text import encode_responses, with_encodable_queries
from rayrlhf.core.training import (
    TrainingStart, epoch_batches, keep_best, optimizer_step, prepare_model, seed_everything, start_training,
)
from rayrlhf.core.work import WorkMeter

log = logging.getLogger(__name__)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood, mean over pairs: -log sigmoid(r_c - r_r) (Stiennon et al. eq. 1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int,
                    max_tokens: int | None = None) -> torch.Tensor:
    """(len(seqs),) scores, in order, computed in micro batches of similar lengths (`micro_batch_groups`)."""
    model.eval()
    out = torch.zeros(len(seqs))
    for group in micro_batch_groups([len(s) for s in seqs], batch_size, max_tokens):
        ids, mask = (t.to(model_device(model)) for t in pad_right([seqs[i] for i in group], pad_id))
        out[group] = sequence_scores(model, ids, mask, max_tokens is not None).float().cpu()
    return out


class RMTrainer:
    """Trains a reward model from the SFT checkpoint; writes `<out_dir>/checkpoint`.

    `role` "rm" is the training reward model; "judge" is the same recipe on the judge's comparisons, disjoint
    from the reward model's (data.judge_fraction), for evaluation only. Metrics are named `<role>/...`."""

    def __init__(self, cfg: Config, out_dir: str | Path, sft_checkpoint: str | Path, resume: bool = False,
                 role: Literal["rm", "judge"] = "rm"):
        self.cfg, self.out_dir, self.sft_checkpoint, self.resume = cfg, Path(out_dir), str(sft_checkpoint), resume
        self.role = role

    def _encode_pairs(self, tok, pairs: list[ComparisonExample]) -> tuple[list[list[int]], list[list[int]]]:
        d = self.cfg.data
        queries = [p.query for p in pairs]
        return (encode_responses(tok, queries, [p.chosen for p in pairs], d.max_prompt_tokens, d.max_summary_tokens),
                encode_responses(tok, queries, [p.rejected for p in pairs], d.max_prompt_tokens, d.max_summary_tokens))

    def run(self) -> dict[str, float]:
        cfg, rm_cfg = self.cfg, self.cfg.rm
        seed_everything(cfg.run.seed)
        t0 = time.time()
        group = TrainGroup.start(cfg.model.mixed_precision, cfg.ray.startup_timeout_s)
        tok = load_tokenizer(self.sft_checkpoint)
        data = with_encodable_queries(tok, load_tldr(cfg.data), cfg.data)
        model = self._model(tok, group)
        train_pairs, valid_pairs = data.pairs(self.role)
        if not train_pairs:
            raise ValueError(f"{self.role}: no training comparisons (a judge needs data.judge_fraction > 0)")
        log.info("%s: %d parameters, %d train / %d valid pairs%s", self.role, count_params(model), len(train_pairs),
                 len(valid_pairs), f", rank {group.rank.rank} of {group.rank.world}" if group.fsdp else "")
        train = self._encode_pairs(tok, train_pairs)
        valid = self._encode_pairs(tok, valid_pairs)  # once, not at every validation
        training = start_training(model, rm_cfg, len(train[0]), "pairs", self.out_dir, cfg.run.keep_checkpoints,
                                  self.resume, {f"{self.role}/valid_accuracy": -1.0}, group)
        step, best = training.step, training.best
        metrics = MetricsLogger(self.out_dir, cfg=cfg) if group.leader else NoMetrics()
        bar = tqdm(total=training.total_steps, initial=step, desc=self.role, mininterval=2, ascii=True,
                   disable=not group.leader)
        for idx in epoch_batches(len(train[0]), rm_cfg.batch_size, rm_cfg.epochs, cfg.run.seed, step):
            row = self._train_step(model, training, train, idx, tok.pad_token_id, group)
            step += 1
            bar.update(1)
            metrics.log(step, row)
            if step % rm_cfg.eval_every == 0 or step == training.total_steps:
                result = self.evaluate(model, tok, valid_pairs, valid)
                metrics.log(step, result)
                bar.set_postfix(valid_acc=f"{result[f'{self.role}/valid_accuracy']:.3f}")
                best = keep_best(step, result, best, f"{self.role}/valid_accuracy", True, model, tok, self.out_dir,
                                 training, group)
        bar.close()
        if group.leader:  # the best checkpoint is a plain folder now: rank 0 sets its bias alone
            best.update(self.normalise(data.sft_train[:512], tok))
        best[f"timing/{self.role}_s"] = time.time() - t0
        metrics.log(step, best)
        metrics.close()
        group.barrier()  # the other ranks end once the checkpoint is final
        return best

    def _model(self, tok, group: TrainGroup):
        """The SFT checkpoint with a fresh scalar head, trainable as the config says, sharded in a group; the plan
        its pairs are cut by."""
        cfg, rm_cfg = self.cfg, self.cfg.rm
        self.sharded = group.fsdp
        model = load_scalar_model(self.sft_checkpoint, tok, cfg.model.dtype, init_head=True)
        model, self.plan, self.cost = prepare_model(model, cfg.model, rm_cfg, group)
        return model

    def _train_step(self, model, training: TrainingStart, train: tuple[list[list[int]], list[list[int]]],
                    idx: list[int], pad_id: int, group: TrainGroup) -> dict[str, float]:
        """One optimizer step on the pairs `idx` (this rank's token-balanced share of them) -> the step's metrics."""
        model.train()
        meter = WorkMeter(next(model.parameters()).device, self.cfg.model.train_compute_dtype)
        chosen_ids, rejected_ids = train
        loss_sum, correct = 0.0, 0
        # chosen and rejected share one forward: a pair takes the longer side's length twice when padded,
        # both sides' tokens when packed
        lengths = [len(chosen_ids[i]) + len(rejected_ids[i]) if self.plan.packed
                   else max(len(chosen_ids[i]), len(rejected_ids[i])) for i in idx]
        mine = group.share(lengths)  # this rank's pairs; each pair's loss weighs 1 / len(idx) on every rank
        share = self._shares(model)
        for g in self.plan.groups([lengths[j] for j in mine]):
            mi = [idx[mine[j]] for j in g]
            chosen, rejected = [chosen_ids[i] for i in mi], [rejected_ids[i] for i in mi]
            r_chosen, r_rejected = self._scores(model, chosen, rejected, pad_id, share)
            meter.train(self.cost, *pair_work(model.config, chosen, rejected, share),
                        checkpointing=self.cfg.model.gradient_checkpointing)
            loss = pairwise_loss(r_chosen, r_rejected) * len(mi) / len(idx)
            loss.backward()
            loss_sum += loss.item()
            correct += int((r_chosen > r_rejected).sum())
        grad_norm = optimizer_step(model, training.opt, training.sched, self.cfg.rm.max_grad_norm)
        summed = group.sum({"loss": loss_sum, "correct": float(correct)})
        work = meter.stop(sum(len(chosen_ids[i]) + len(rejected_ids[i]) for i in idx))
        return {f"{self.role}/loss": summed["loss"], f"{self.role}/train_accuracy": summed["correct"] / len(idx),
                f"{self.role}/grad_norm": grad_norm, f"{self.role}/lr": training.sched.get_last_lr()[0],
                f"{self.role}/tokens_per_s": work.tokens_per_s, f"{self.role}/mfu": work.mfu}

    sharded = False  # an FSDP group: its units' parameters are freed between the two passes (below)

    def _shares(self, model) -> bool:
        """Each pair's shared start run once (`pair_scores`) where `may_share_prefix` allows: padded micro batches,
        the KV cache on, one process, and not while dropout is active in training (one mask for the post of both
        sides) nor on a sliding-window cache."""
        rm_cfg = self.cfg.rm
        return rm_cfg.share_prefix and may_share_prefix(
            [model], packed=rm_cfg.max_tokens_per_micro_batch is not None,
            gradient_checkpointing=self.cfg.model.gradient_checkpointing, sharded=self.sharded)

    def _scores(self, model, chosen: list[list[int]], rejected: list[list[int]], pad_id: int, share: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' scores of a micro batch of pairs: the shared start once, or both sides whole in one
        forward (2b rows, padded or packed)."""
        if share:  # `_shares(model)`, decided once per step or evaluation
            return pair_scores(model, chosen, rejected, pad_id)
        ids, mask = (t.to(model_device(model)) for t in pad_right(chosen + rejected, pad_id))
        r = sequence_scores(model, ids, mask, self.cfg.rm.max_tokens_per_micro_batch is not None)
        return r[: len(chosen)], r[len(chosen):]

    @torch.no_grad()
    def _pair_scores(self, model, chosen: list[list[int]], rejected: list[list[int]], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair's scores, in order, in micro batches of similar lengths."""
        model.eval()
        rm_cfg, share = self.cfg.rm, self._shares(model)
        out_c, out_r = torch.zeros(len(chosen)), torch.zeros(len(chosen))
        lengths = [len(c) + len(r) for c, r in zip(chosen, rejected)]
        for g in micro_batch_groups(lengths, rm_cfg.micro_batch_size, rm_cfg.max_tokens_per_micro_batch):
            sc, sr = self._scores(model, [chosen[i] for i in g], [rejected[i] for i in g], pad_id, share)
            out_c[g], out_r[g] = sc.float().cpu(), sr.float().cpu()
        return out_c, out_r

    def evaluate(self, model, tok, pairs: list[ComparisonExample],
                 encoded: tuple[list[list[int]], list[list[int]]] | None = None) -> dict[str, float]:
        c, r = encoded if encoded is not None else self._encode_pairs(tok, pairs)
        r_chosen, r_rejected = self._pair_scores(model, c, r, tok.pad_token_id)
        agree = r_chosen > r_rejected
        out = {f"{self.role}/valid_accuracy": agree.float().mean().item(),
               f"{self.role}/valid_loss": pairwise_loss(r_chosen, r_rejected).item(),
               f"{self.role}/valid_pairs": float(len(c))}  # the accuracy's sample size (its interval, its test)
        if pairs[0].gold_agrees is not None:
            gold = torch.tensor([p.gold_agrees for p in pairs])
            # A pair's gold label is the dataset label unless noise flipped it.
            out[f"{self.role}/valid_gold_accuracy"] = (agree == gold).float().mean().item()
            out[f"{self.role}/label_noise_ceiling"] = gold.float().mean().item()
        return out

    def normalise(self, references: list[SummaryExample], tok) -> dict[str, float]:
        """Set config.reward_bias so references score 0 on average, and re-save the best checkpoint."""
        path = self.out_dir / "checkpoint"
        model = load_scalar_model(str(path), tok, self.cfg.model.dtype)
        d = self.cfg.data
        seqs = encode_responses(tok, [e.query for e in references], [e.reference for e in references],
                                d.max_prompt_tokens, d.max_summary_tokens)
        raw = score_sequences(model, seqs, tok.pad_token_id, 2 * self.cfg.rm.micro_batch_size)
        model.config.reward_bias = -raw.mean().item()
        save_checkpoint(model, tok, path)
        return {f"{self.role}/reward_bias": model.config.reward_bias,
                f"{self.role}/reference_reward_std": raw.std().item()}
