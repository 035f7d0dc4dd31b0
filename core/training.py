"""What the SFT and reward-model trainers share: seeding, the data cursor, the optimizer step, keeping the best.

Two call sites each, so functions, not a Trainer framework: each trainer's loop stays readable on its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from rayrlhf.core.checkpoints import CheckpointDir, resume_or_start, save_training_state
from rayrlhf.core.config import ModelConfig, RMConfig, SFTConfig
from rayrlhf.core.forward import check_packing
from rayrlhf.core.modeling import default_device, save_checkpoint, trainable
from rayrlhf.core.plan import ForwardPlan
from rayrlhf.core.sharding import TrainGroup, clip_grad_norm, full_weights, plain_copy, shard_model
from rayrlhf.core.work import ModelCost


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Example indices of each optimizer step from `start_step` on (the last partial batch of an epoch dropped).
    An epoch's order is a function of (seed, epoch) only, so a step number is a complete data cursor."""
    per_epoch = n // batch_size
    for epoch in range(start_step // per_epoch, epochs):
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        for b in range(max(0, start_step - epoch * per_epoch), per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]


def prepare_model(model: torch.nn.Module, model_cfg: ModelConfig, tc: SFTConfig | RMConfig,
                  group: TrainGroup = TrainGroup()) -> tuple[torch.nn.Module, ForwardPlan, ModelCost]:
    """A loaded model made trainable as `model_cfg` says (LoRA or full), its packing checked where `tc` packs,
    sharded in a group (before the optimizer: it holds the shards); with the plan its batches are cut by and what
    its FLOPs are counted from. A causal LM for SFT, a scalar model for the reward model (`tc.section`)."""
    causal_lm = tc.section == "sft"
    # On the actor's GPU where it has one (the learner's rule); a sharded model's shards follow it there.
    model = trainable(model, model_cfg, "CAUSAL_LM" if causal_lm else "SEQ_CLS").to(default_device())
    if tc.max_tokens_per_micro_batch is not None:
        check_packing(model, f"{tc.section}.max_tokens_per_micro_batch")
    if group.fsdp:
        model = shard_model(model, model_cfg.mixed_precision)
    plan = ForwardPlan(tc.micro_batch_size, tc.max_tokens_per_micro_batch, busiest=group.busiest if group.fsdp else None)
    return model, plan, ModelCost.of(model, causal_lm)


def adamw_cosine(model: torch.nn.Module, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int):
    """AdamW over the trainable parameters, cosine decay after a linear warm-up of `warmup_ratio` of the steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, int(warmup_ratio * total_steps), total_steps)


@dataclass
class TrainingStart:
    """What a trainer's loop starts from: the step count, optimizer and schedule, where checkpoints go, and the
    step and best result to go on from (those of the latest checkpoint when resuming)."""

    total_steps: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ckpts: CheckpointDir
    step: int
    best: dict[str, float]


def start_training(model: torch.nn.Module, tc: SFTConfig | RMConfig, n_train: int, unit: str, out_dir: Path,
                   keep: int, resume: bool, best: dict[str, float], group: TrainGroup = TrainGroup()) -> TrainingStart:
    """Optimizer and schedule for `tc.epochs` passes over `n_train` training `unit`s (examples, pairs); resumed
    from `out_dir`'s latest checkpoint when `resume`. ValueError when one batch does not fit in the training set.
    A sharded `model` (`group.fsdp`) must be wrapped already: the optimizer holds its shards."""
    steps_per_epoch = n_train // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{tc.section}.batch_size {tc.batch_size} exceeds the {n_train} training {unit}")
    total = steps_per_epoch * tc.epochs
    opt, sched = adamw_cosine(model, tc.lr, tc.weight_decay, tc.warmup_ratio, total)
    ckpts = CheckpointDir(out_dir / "checkpoints", keep)
    step, best = resume_or_start(ckpts, resume, out_dir, model, opt, sched, best, group)
    return TrainingStart(total, opt, sched, ckpts, step, best)


def optimizer_step(model: torch.nn.Module, opt, sched, max_grad_norm: float) -> float:
    """Clip, step, advance the schedule, clear the gradients; returns the gradient norm before clipping (of the
    full gradient when sharded)."""
    grad_norm = clip_grad_norm(model, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(grad_norm)


def keep_best(step: int, result: dict[str, float], best: dict[str, float], key: str, higher_is_better: bool,
              model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
              training: TrainingStart, group: TrainGroup = TrainGroup()) -> dict[str, float]:
    """After a validation at `step`: when `result` beats `best` on `key`, it becomes the best and its weights
    `<out_dir>/checkpoint`; then the resumable training state is saved. Returns the best result so far.
    In a group every rank calls it (gathering weights and saving shards are collectives)."""
    better = result[key] > best[key] if higher_is_better else result[key] < best[key]
    if better:
        best = {**result, f"{key.split('/')[0]}/best_step": step}
        save_model(model, tokenizer, out_dir / "checkpoint", group)
    save_training_state(training.ckpts, step, model, training.opt, training.sched, best, group)
    return best


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path,
               group: TrainGroup = TrainGroup()) -> None:
    """The plain Hugging Face folder of `model` (LoRA merged). Sharded, every rank gathers the full weights one
    tensor at a time (a collective) and rank 0 writes them."""
    if not group.fsdp:
        save_checkpoint(model, tokenizer, path)
        return
    weights = {name: t.cpu() for name, t in full_weights(model)}
    if group.leader:
        save_checkpoint(plain_copy(model, weights), tokenizer, path)
    group.barrier()
