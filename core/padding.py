"""Padding and layout of token rows: `[pad.. prompt | response .. pad]`.

A rollout of B sequences has prompts left-padded to P and responses right-padded to R after their first EOS.
Positions count from each row's first real token (`position_ids`), as generate and vLLM count them, so every
role computes the same outputs for the same weights whatever the padding, trimming, flushing or packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """-> ids (B, P), mask (B, P), left-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """-> ids (B, W), mask (B, W), right-padded to `width` (default: the longest)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def trim_padding(prompts: Tensor, prompt_mask: Tensor, responses: Tensor | None = None,
                 response_mask: Tensor | None = None) -> tuple[Tensor, ...]:
    """Drop the prompt columns that are padding in every row (left) and the response columns after the longest
    response (right). -> (prompts, prompt_mask[, responses, response_mask]).

    A rollout is padded to the longest prompt and to max_new_tokens for the whole batch; a micro batch of it
    usually needs less. Masked columns change nothing (positions count from the first real token), so the
    outputs on the kept columns are those of the untrimmed call, up to float rounding.
    """
    first = int(prompt_mask.any(0).long().argmax()) if prompt_mask.any() else prompt_mask.shape[1] - 1
    out: tuple[Tensor, ...] = (prompts[:, first:], prompt_mask[:, first:])
    if responses is not None and response_mask is not None:
        width = max(int(response_mask.sum(-1).max()), 1)
        out += (responses[:, :width], response_mask[:, :width])
    return out


def position_ids(mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, as generate and vLLM count them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def truncate_after_eos(responses: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Keep tokens up to and including the first EOS, pad the rest (detail 5). -> (responses, mask) (B, R)."""
    is_eos = responses == eos_id
    # after_eos[b, t] = an EOS occurred strictly before t
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).long()
    return responses.masked_fill(after_eos, pad_id), mask


def has_eos(responses: Tensor, response_mask: Tensor, eos_id: int) -> Tensor:
    """(B,) bool: the response ended with EOS within its budget."""
    return ((responses == eos_id) & response_mask.bool()).any(-1)


def flush_right(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's real tokens moved together to the right end of a row as wide as the longest row's real tokens
    -> ids (B, W), mask (B, W) (padding on the left only), and each position's column there (B, T; -1 at padding).

    A rollout row is `[pad.. prompt | response .. pad]`: prompts and responses padded apart, so a micro batch of
    rows with similar total lengths still computes the longest prompt plus the longest response for every row
    (a sixth more positions than real tokens on the recipe's lengths). Flushed right, only the total is padded;
    positions still count from each row's first real token, so every real position's output is unchanged."""
    keep = mask.bool()
    lengths = keep.sum(-1, keepdim=True)
    width = max(int(lengths.max()), 1)
    index = torch.where(keep, keep.long().cumsum(-1) - 1 + (width - lengths), -1)
    rows = keep.nonzero(as_tuple=True)[0]
    flushed, flushed_mask = ids.new_zeros((ids.shape[0], width)), mask.new_zeros((ids.shape[0], width))
    flushed[rows, index[keep]] = ids[keep]
    flushed_mask[rows, index[keep]] = 1
    return flushed, flushed_mask, index


def pack(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The real tokens of a padded batch as one row -> ids (1, N), positions (1, N) restarting at 0 for every
    sequence, and each padded position's index into that row (B, T; -1 at padding).

    Called with these positions and no attention mask, transformers' models read the position restarts as
    sequence boundaries (`masking_utils.find_packed_sequence_indices`): each token attends only within its own
    sequence, so every real position's output is the padded batch's, and no compute goes to padding."""
    keep = mask.bool()
    index = torch.where(keep, keep.flatten().long().cumsum(0).view_as(keep) - 1, -1)
    return ids[keep].unsqueeze(0), position_ids(mask)[keep].unsqueeze(0), index


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of each row's last real token."""
    T = mask.shape[1]
    return (mask.long() * torch.arange(T, device=mask.device)).argmax(-1)
