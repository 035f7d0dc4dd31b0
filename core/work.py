"""The work meter: the model work one call of a role ran, and the time it took -> MFU and tokens/s.

A role counts each forward (or forward and backward) as it ran: the positions computed and attention's FLOPs
(`plan.MicroBatch.work`, `pairs.pair_work`), and for a causal LM the positions that went through its head. The
meter turns them into FLOPs with `throughput`'s formula and divides by the seconds and the device's peak, which
it reads before the clock starts (the peak is a short probe, once per process, on a CPU). No role computes
FLOPs itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from rayrlhf.core.throughput import (
    forward_flops, mfu, model_head_params, model_params, peak_flops, training_flops,
)


@dataclass(frozen=True)
class ModelCost:
    """What a model's FLOPs are counted from, read once: its config (attention's shape), its matmul parameters (and
    the trainable ones among them), and a causal LM's output head (0 for a scalar model, whose head is a vector)."""

    config: object
    params: int
    trainable: int
    head: int = 0
    head_trainable: int = 0

    @classmethod
    def of(cls, model: nn.Module, causal_lm: bool = True) -> ModelCost:
        params, trainable = model_params(model)
        head, head_trainable = model_head_params(model) if causal_lm else (0, 0)
        return cls(model.config, params, trainable, head, head_trainable)


@dataclass(frozen=True)
class Work:
    """What one metered call ran: its seconds (wall and this process's CPU), FLOPs, MFU and tokens/s."""

    seconds: float
    cpu_seconds: float
    flops: float
    mfu: float
    tokens_per_s: float


class WorkMeter:
    """Started when a call begins; `forward` / `train` / `ran` add the work as it runs; `stop` reads the clock
    (or `stop_clock` does, when the work is counted after the timed call: a rollout's from its output).

    `devices`: the devices one forward is split over (vLLM's tensor parallelism), whose peaks add up."""

    def __init__(self, device: str | torch.device, dtype: str, devices: int = 1):
        self.peak = peak_flops(device, dtype) * devices  # measured once per process, before the clock starts
        self.flops = 0.0
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.stopped: tuple[float, float] | None = None  # (wall, CPU) seconds, once the clock is stopped

    def forward(self, cost: ModelCost, positions: int, attention: float = 0.0, head_positions: int = 0) -> None:
        """One forward over `positions` (with `attention` FLOPs), `head_positions` of them through the LM head."""
        self.flops += forward_flops(cost.params, positions) + attention + forward_flops(cost.head, head_positions)

    def train(self, cost: ModelCost, positions: int, attention: float = 0.0, head_positions: int = 0,
              checkpointing: bool = False) -> None:
        """A forward and backward (and the recomputed forward under gradient checkpointing; never of the head)."""
        self.flops += (training_flops(cost.params, cost.trainable, positions, checkpointing, attention)
                       + training_flops(cost.head, cost.head_trainable, head_positions))

    def ran(self, cost: ModelCost, micro_batch, train: bool = False, checkpointing: bool = False) -> None:
        """One `plan.MicroBatch` as it ran (each distinct prompt once where it ran once); the head sees the positions
        that predict response tokens."""
        positions, attention = micro_batch.work(cost.config)
        head = micro_batch.response_tokens if cost.head else 0
        if train:
            self.train(cost, positions, attention, head, checkpointing)
        else:
            self.forward(cost, positions, attention, head)

    def stop_clock(self) -> None:
        """The timed work is over: `stop` reports these seconds, whatever is counted after."""
        self.stopped = (time.perf_counter() - self.t0, time.process_time() - self.cpu0)

    def stop(self, tokens: int = 0) -> Work:
        """The work so far and the seconds since the meter started (or until `stop_clock`); `tokens`: what
        tokens/s counts."""
        if self.stopped is None:
            self.stop_clock()
        seconds, cpu_seconds = self.stopped
        return Work(seconds, cpu_seconds, self.flops, mfu(self.flops, seconds, self.peak),
                    tokens / seconds if seconds > 0 else 0.0)
