"""Scoring both sides of a comparison with their shared start (the post) run once: the reward model's pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rayrlhf.core.forward import model_device, scalar_model_parts, sequence_scores
from rayrlhf.core.padding import pad_left, pad_right, position_ids
from rayrlhf.core.throughput import shared_prefix_work
from torch import Tensor, nn


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens two sequences share at their start, leaving each at least one token of its own."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def shared_starts(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]) -> list[int] | None:
    """Each pair's shared start, or None when some pair has none: then `pair_scores` runs whole sides."""
    shared = [common_prefix(c, r) for c, r in zip(chosen, rejected)]
    return shared if shared and min(shared) > 0 else None


def pair_work(config, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], share: bool
              ) -> tuple[int, float]:
    """(positions computed, attention forward FLOPs) of scoring these pairs: `pair_scores` with `share` (each
    pair's shared start once where every pair has one), both sides whole otherwise."""
    shared = shared_starts(chosen, rejected) if share else None
    lengths = [len(side) for pair in zip(chosen, rejected) for side in pair]
    if shared is None:
        return shared_prefix_work(config, lengths, [0] * len(lengths), None)
    return shared_prefix_work(config, lengths, [n for n in shared for _ in range(2)],
                              [i for i in range(len(shared)) for _ in range(2)])


def pair_scores(model: nn.Module, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                pad_id: int) -> tuple[Tensor, Tensor]:
    """Scores of both sides of comparisons -> (b,), (b,), as `sequence_scores` gives them, with each pair's shared
    start (the post) run through the backbone once: both continuations attend to its keys and values.

    On TL;DR the post is most of each side, so a pair costs about one post and two summaries instead of two
    posts and two summaries. Causal attention never lets the prefix see what follows it, so its keys and values
    are the ones each whole side would compute, and the gradient reaches them through the cache."""
    backbone, head = scalar_model_parts(model)
    device = model_device(model)
    shared = shared_starts(chosen, rejected)
    if shared is None:
        ids, mask = (t.to(device) for t in pad_right([*chosen, *rejected], pad_id))
        scores = sequence_scores(model, ids, mask)
        return scores[: len(chosen)], scores[len(chosen):]
    prefix, prefix_mask = (t.to(device) for t in pad_left([c[:n] for c, n in zip(chosen, shared)], pad_id))
    cache = backbone(input_ids=prefix, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                     use_cache=True).past_key_values
    cache.batch_repeat_interleave(2)  # rows c0, r0, c1, r1, ...
    ids, mask = (t.to(device) for t in pad_right([side[n:] for c, r, n in zip(chosen, rejected, shared)
                                                  for side in (c, r)], pad_id))
    start = torch.tensor(shared, device=device).repeat_interleave(2).unsqueeze(1)  # positions go on from each prefix's end
    hidden = backbone(input_ids=ids, attention_mask=torch.cat([prefix_mask.repeat_interleave(2, 0), mask], 1),
                      position_ids=start + torch.arange(ids.shape[1], device=device), past_key_values=cache,
                      use_cache=True).last_hidden_state
    last = hidden[torch.arange(ids.shape[0], device=device), mask.sum(-1) - 1]  # each side's last real token (detail 7)
    scores = head(last).squeeze(-1).float()
    return scores[0::2], scores[1::2]
