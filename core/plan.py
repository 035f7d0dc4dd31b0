"""How a role cuts a batch for its forwards: micro batches, packing, prefix sharing, and the work each one ran.

Every role that runs a model over rows builds one `ForwardPlan` when it starts: rows per padded micro batch, the
token budget of packed ones, and whether a shared prefix runs once, decided there by one rule
(`may_share_prefix`). `ForwardPlan.cut` yields the micro batches of a rollout, `ForwardPlan.groups` the cut of
any list of lengths (SFT examples, comparison pairs); each `MicroBatch` counts the work its forward runs
(`MicroBatch.work`), which `work.WorkMeter` turns into FLOPs and MFU. The losses are token sums divided by the
whole batch's token count, so how a batch is cut changes no update, only its padding and its time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from rayrlhf.core.padding import trim_padding
from rayrlhf.core.throughput import shared_prefix_work
from torch import Tensor, nn


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Positions into `lengths`, longest first (ties in position order): the order every cut of a batch deals in."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def token_budget_groups(lengths: Sequence[int], max_tokens: int, n_groups: int | None = None) -> list[list[int]]:
    """Positions into `lengths` in micro batches of at most `max_tokens` tokens each, for packing (`pack`).

    The fewest groups the budget allows (or `n_groups`, when every rank of a group must run the same number of
    forward and backward passes), filled longest first into the least loaded group, so they come out balanced;
    a sequence longer than the budget is a group of its own. Like `length_grouped`, the cut changes no update."""
    if not lengths:
        return []
    order = longest_first(lengths)
    total = sum(lengths)
    k = n_groups or max(1, -(-total // max_tokens))
    while True:
        loads, groups = [0] * k, [[] for _ in range(k)]
        for i in order:
            g = min(range(k), key=lambda j: (loads[j], j))
            groups[g].append(i)
            loads[g] += lengths[i]
        if n_groups is not None or k >= len(lengths) or max(loads) <= max_tokens:
            return [g for g in groups if g]
        k += 1


def micro_batch_groups(lengths: Sequence[int], size: int, max_tokens: int | None = None,
                       n_groups: int | None = None, prompts: Sequence[int] | None = None) -> list[list[int]]:
    """How a batch is cut: `token_budget_groups` (then packed) when a token budget is set, else
    `length_grouped` by `size` sequences (then padded; a prompt's samples together when `prompts` is given)."""
    if max_tokens is None:
        return length_grouped(lengths, size, prompts)
    return token_budget_groups(lengths, max_tokens, n_groups)


def length_grouped(lengths: Sequence[int], size: int, prompts: Sequence[int] | None = None) -> list[list[int]]:
    """Positions into `lengths` in micro batches of `size`, longest first. `prompts` (an id per position): the
    positions of one prompt come one after another (ordered by their longest), so that a micro batch holds a
    prompt's samples together and `shared_prompt_outputs` runs the prompt once.

    The losses are token sums divided by the whole batch's token count, so how a batch is cut into micro batches
    does not change the update; grouping similar lengths only removes padding (on real TL;DR posts cut at a
    newline, the prompts of one batch range from a few dozen tokens to the budget)."""
    if prompts is None:
        order = longest_first(lengths)
    else:
        longest: dict[int, int] = {}
        for n, g in zip(lengths, prompts):
            longest[g] = max(longest.get(g, 0), n)
        order = sorted(range(len(lengths)), key=lambda i: (-longest[prompts[i]], prompts[i], -lengths[i], i))
    return [order[m : m + size] for m in range(0, len(order), size)]


def prompt_ids(prompts: Tensor, prompt_mask: Tensor) -> list[int]:
    """An id per row, equal for rows with the same (padded) prompt: the n samples of one prompt."""
    return torch.unique(torch.cat([prompts, prompt_mask], 1), dim=0, return_inverse=True)[1].tolist()


def repeats_a_prompt(prompts: Tensor, prompt_mask: Tensor) -> bool:
    """Whether some prompt is in more than one row: only then does running each prompt once save work (a batch
    of distinct prompts would pay for two passes and the cache copies, about a tenth more on the recipe's shapes)."""
    return torch.unique(torch.cat([prompts, prompt_mask], 1), dim=0).shape[0] < prompts.shape[0]


def prefix_runs_once_exactly(model: nn.Module) -> bool:
    """Whether running a shared prefix once (`shared_prompt_outputs`, `pair_scores`) gives exactly each whole
    row's outputs for this model: its KV cache keeps every prefix position (no sliding-window or chunked
    attention layer, which would keep only the last positions), and no dropout is active (the prefix would draw
    one mask for all its rows instead of one per row)."""
    config = model.config
    types = getattr(config, "layer_types", None)
    full = (all(t == "full_attention" for t in types) if types is not None
            else getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None)
    dropout = model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    return full and not dropout


def sequence_work(config, lengths: Sequence[int]) -> tuple[int, float]:
    """(positions computed, attention forward FLOPs) of one forward over whole sequences of these lengths."""
    return shared_prefix_work(config, lengths, [0] * len(lengths), None)


def response_work(config, prompt_mask: Tensor, response_mask: Tensor, prompts: Tensor | None = None
                  ) -> tuple[int, float]:
    """(positions computed, attention forward FLOPs) of one forward over these rows: each prompt once when
    `prompts` is given (the rows ran `shared_prompt_outputs`), every row whole otherwise."""
    groups = prompt_ids(prompts, prompt_mask) if prompts is not None else None
    return shared_prefix_work(config, (prompt_mask.sum(-1) + response_mask.sum(-1)).tolist(),
                              prompt_mask.sum(-1).tolist(), groups)


def may_share_prefix(models: Sequence[nn.Module | None], *, packed: bool = False, gradient_checkpointing: bool = False,
                     sharded: bool = False) -> bool:
    """The one rule for running a shared prefix once (a prompt for its n samples, a post for both sides of a pair):
    padded micro batches (packed rows run whole), the KV cache on (gradient checkpointing turns it off), in one
    process (a group's ranks must make the same passes, and under FSDP2 a fully trained model called twice before
    one backward fails), on models where it gives exactly each whole row's outputs (`prefix_runs_once_exactly`)."""
    return (not packed and not gradient_checkpointing and not sharded
            and all(prefix_runs_once_exactly(m) for m in models if m is not None))


@dataclass(frozen=True)
class MicroBatch:
    """Rows of a rollout cut for one forward (`ForwardPlan.cut`), trimmed of all-padding columns, on the device."""

    rows: Tensor  # positions in the rollout
    positions: list[int]  # positions in the rows the plan was asked to cut
    prompts: Tensor
    prompt_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    one_pass: bool  # the plan shares prompts and one repeats here: each distinct prompt runs once

    def work(self, config) -> tuple[int, float]:
        """(positions computed, attention forward FLOPs) of the forward over these rows as it runs."""
        return response_work(config, self.prompt_mask, self.response_mask, self.prompts if self.one_pass else None)

    @property
    def response_tokens(self) -> int:
        """The positions that predict a response token: all that goes through a causal LM's head."""
        return int(self.response_mask.sum())


@dataclass(frozen=True)
class ForwardPlan:
    """How one role cuts its rows: `rows` per padded micro batch (longest first), or packed micro batches of at
    most `max_tokens` tokens, each distinct prompt run once where `share_prompts`. In a group of FSDP ranks,
    every rank runs as many packed micro batches as the busiest (FSDP's collectives need equal passes):
    `busiest(n)` is the most any rank has (`sharding.TrainGroup.busiest`)."""

    rows: int
    max_tokens: int | None = None
    share_prompts: bool = False
    device: torch.device | str = "cpu"
    busiest: Callable[[int], int] | None = None

    @classmethod
    def build(cls, rows: int, max_tokens: int | None, share_prompts: bool, models: Sequence[nn.Module | None], *,
              device: torch.device | str = "cpu", gradient_checkpointing: bool = False, sharded: bool = False,
              busiest: Callable[[int], int] | None = None) -> ForwardPlan:
        """The plan of a role whose config asks for `share_prompts`, on `models`: shared where `may_share_prefix`."""
        share = share_prompts and may_share_prefix(models, packed=max_tokens is not None,
                                                   gradient_checkpointing=gradient_checkpointing, sharded=sharded)
        return cls(rows, max_tokens, share, device, busiest)

    @property
    def packed(self) -> bool:
        return self.max_tokens is not None

    def groups(self, lengths: Sequence[int], prompts: Sequence[int] | None = None) -> list[list[int]]:
        """Positions into `lengths` per micro batch (`micro_batch_groups`); `prompts`: an id per position, a
        prompt's samples together (padded micro batches only)."""
        passes = None
        if self.max_tokens is not None and self.busiest is not None:
            passes = self.busiest(len(token_budget_groups(lengths, self.max_tokens)))
        return micro_batch_groups(lengths, self.rows, self.max_tokens, passes, prompts)

    def cut(self, prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor,
            rows: Tensor | None = None, trim_responses: bool = True) -> Iterator[MicroBatch]:
        """The micro batches of these rollout `rows` (default: all), of similar lengths, a prompt's samples together
        when prompts are shared, each trimmed of padding (`micro_batch`) and moved to the device."""
        rows = torch.arange(prompts.shape[0]) if rows is None else rows
        lengths = (prompt_mask[rows].sum(-1) + response_mask[rows].sum(-1)).tolist()
        ids = prompt_ids(prompts[rows], prompt_mask[rows]) if self.share_prompts else None
        for group in self.groups(lengths, ids):
            yield self.micro_batch(prompts, prompt_mask, responses, response_mask, rows[group], group, trim_responses)

    def micro_batch(self, prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor,
                    rows: Tensor, positions: list[int], trim_responses: bool = True) -> MicroBatch:
        """These rows as one micro batch, in the order given (`cut` picks them): the prompt columns that are padding
        in every row dropped, and with `trim_responses` the response columns after the longest response (the
        critic keeps them: its values fill the batch's (B, R))."""
        p, pm = trim_padding(prompts[rows], prompt_mask[rows])
        r, rm = responses[rows], response_mask[rows]
        if trim_responses:
            _, _, r, rm = trim_padding(p, pm, r, rm)
        one_pass = self.share_prompts and repeats_a_prompt(p, pm)
        return MicroBatch(rows, positions, *(t.to(self.device) for t in (p, pm, r, rm)), one_pass)
