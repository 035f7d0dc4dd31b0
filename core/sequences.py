"""Token-level plumbing shared by every role: padding, positions, log-probs, values, scores, sampling.

Layout of a rollout (B sequences): `[pad.. prompt | response .. pad]` — prompts left-padded to P, responses
right-padded to R after their first EOS. Every role computes log-probs with `response_logprobs`, from
logits divided by the sampling temperature (detail 11), with positions counted from the first real token,
so the generator, the reference and the learner agree exactly for the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrlhf.core.throughput import shared_prefix_work

if TYPE_CHECKING:
    from transformers import GenerationConfig


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


def response_work(config, prompt_mask: Tensor, response_mask: Tensor, prompts: Tensor | None = None
                  ) -> tuple[int, float]:
    """(positions computed, attention forward FLOPs) of one forward over these rows: each prompt once when
    `prompts` is given (the rows ran `shared_prompt_outputs`), every row whole otherwise."""
    groups = prompt_ids(prompts, prompt_mask) if prompts is not None else None
    return shared_prefix_work(config, (prompt_mask.sum(-1) + response_mask.sum(-1)).tolist(),
                              prompt_mask.sum(-1).tolist(), groups)


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


@dataclass(frozen=True)
class RolloutMicroBatch:
    """Rows of a rollout cut for one forward (`rollout_micro_batches`), trimmed of all-padding columns, on device."""

    rows: Tensor  # positions in the rollout
    prompts: Tensor
    prompt_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    one_pass: bool  # share_prompts and a prompt repeats here: run each distinct prompt once

    def work(self, config) -> tuple[int, float]:
        """(positions computed, attention forward FLOPs) of the forward over these rows as it runs."""
        return response_work(config, self.prompt_mask, self.response_mask, self.prompts if self.one_pass else None)


def rollout_micro_batches(prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor, size: int,
                          max_tokens: int | None, share_prompts: bool, device) -> Iterator[RolloutMicroBatch]:
    """How the scoring roles (reference, reward) cut a rollout: `micro_batch_groups` of similar lengths (packed
    under a token budget, rows whole), a prompt's samples together when `share_prompts`, each trimmed of padding."""
    share_prompts = share_prompts and max_tokens is None  # packed rows run whole
    lengths = (prompt_mask.sum(-1) + response_mask.sum(-1)).tolist()
    groups = prompt_ids(prompts, prompt_mask) if share_prompts else None
    for group in micro_batch_groups(lengths, size, max_tokens, prompts=groups):
        rows = torch.tensor(group)
        p, pm, r, rm = (t.to(device) for t in trim_padding(prompts[rows], prompt_mask[rows], responses[rows],
                                                           response_mask[rows]))
        yield RolloutMicroBatch(rows, p, pm, r, rm, share_prompts and repeats_a_prompt(p, pm))


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


def eos_trick(raw_scores: Tensor, has_eos: Tensor, missing_eos_score: float | None) -> Tensor:
    """(B,) scores: a response that used its whole budget without emitting EOS gets `missing_eos_score` instead
    of the reward model's score (detail 6, Huang et al. 2024); None keeps the model's score."""
    if missing_eos_score is None:
        return raw_scores
    return torch.where(has_eos, raw_scores, torch.full_like(raw_scores, missing_eos_score))


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


@torch.no_grad()
def check_packing(model: nn.Module, key: str) -> None:
    """Fail, naming `key` (the config key that asked for packing), if this model's outputs on a packed row are not
    each sequence's own: `pack` relies on the model reading position restarts as sequence boundaries, and some
    transformers models (OPT) build their causal mask without the positions and attend across sequences.

    A probe of two short sequences, once at start: the second sequence's last hidden states, packed after two
    different first sequences, must be equal (no attention crosses the boundary) and equal to it run alone."""
    param = next(model.parameters())
    device, vocab = param.device, int(model.config.vocab_size)
    first_a, first_b, second = ([t % vocab for t in ts] for ts in ((3, 4, 5), (6, 7, 8), (9, 10, 11, 12)))

    def last_hidden(ids: list[int], positions: list[int]) -> Tensor:
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                    use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][0, -len(second):].float()

    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        restart = [0, 1, 2, 0, 1, 2, 3]
        after_a, after_b = last_hidden(first_a + second, restart), last_hidden(first_b + second, restart)
        alone = last_hidden(second, [0, 1, 2, 3])
    finally:
        model.train(was_training)
    scale = float(alone.abs().max()) + 1e-6
    tol = 1e-4 if param.dtype == torch.float32 else 2e-2  # half precision rounds more
    leak = float((after_a - after_b).abs().max()) / scale
    error = float((after_a - alone).abs().max()) / scale
    if leak > tol or error > tol:
        raise ValueError(f"{key}: {model.config.model_type} models attend across the sequences of a packed micro "
                         f"batch (transformers builds their causal mask without the position restarts; probe: "
                         f"relative difference {max(leak, error):.2g}), so packing would change every output; "
                         f"unset {key} to pad micro batches instead")


def response_logits(model: nn.Module, ids: Tensor, mask: Tensor, R: int, packed: bool = False) -> Tensor:
    """Logits at the R positions that predict the response tokens -> (B, R, V).

    Only those go through the LM head (`logits_to_keep`): the prompt positions' logits are never used, and on
    a small model the head is a fifth of the forward and backward cost. Padded: rows flushed right (`flush_right`);
    `packed`: one row of the real tokens (`pack`). Positions that are padding get logits 0.
    """
    if not packed:  # flushed right: every row's response ends in the last column, so R + 1 columns hold them all
        flushed, fmask, index = flush_right(ids, mask)
        window = model(input_ids=flushed, attention_mask=fmask, position_ids=position_ids(fmask), use_cache=False,
                       logits_to_keep=R + 1).logits  # the last R + 1 columns (all of them when the rows are shorter)
        predicting = index[:, -R - 1 : -1]
        columns = (predicting - (flushed.shape[1] - window.shape[1])).clamp(min=0)
        logits = window.gather(1, columns.unsqueeze(-1).expand(-1, -1, window.shape[-1]))
        return logits.masked_fill_((predicting < 0).unsqueeze(-1), 0.0)  # in place: gather's backward needs no output
    flat, pos, index = pack(ids, mask)
    predicting = index[:, -R - 1 : -1]  # (B, R): the position before each response token
    real = predicting >= 0
    out = model(input_ids=flat, position_ids=pos, use_cache=False, logits_to_keep=predicting[real])
    logits = out.logits[0]
    full = logits.new_zeros((*predicting.shape, logits.shape[-1]))
    return full.index_put((real.nonzero(as_tuple=True)), logits)


def shared_prompt_outputs(forward, prompts: Tensor, prompt_mask: Tensor, responses: Tensor,
                          response_mask: Tensor) -> Tensor:
    """A model's outputs at the R positions that predict the response tokens -> (B, R, ...), with each distinct
    prompt of the batch run once: its samples' responses run on its cached keys and values.

    With n samples per prompt, a row is mostly prompt (on TL;DR a post of up to 160 tokens, a summary of up to
    53), so the prompt once instead of n times is most of the work saved. Causal attention never lets a prompt see
    its response, so the outputs are the whole rows' (the gradient reaches the prompt through the cache).
    `forward(ids, mask, positions, cache, last_only)` -> (outputs (b, T or 1, ...), cache) runs the model;
    the position before response token 0 is the prompt's last (prompts are left-padded), the rest are the
    response's own. Positions that predict nothing (after a response's end) hold 0."""
    P, R = prompts.shape[1], responses.shape[1]
    distinct, inverse = torch.unique(torch.cat([prompts, prompt_mask], 1), dim=0, return_inverse=True)
    first, cache = forward(distinct[:, :P], distinct[:, P:], position_ids(distinct[:, P:]), None, True)
    cache.batch_select_indices(inverse)
    start = prompt_mask.sum(-1, keepdim=True)  # positions go on from each prompt's end
    # Response token t-1 predicts token t, so the last token's output is dropped (it still runs: two passes
    # whatever the responses' lengths, one-token responses too).
    rest, _ = forward(responses, torch.cat([prompt_mask, response_mask], 1),
                      start + torch.arange(R, device=start.device), cache, False)
    out = torch.cat([first[inverse], rest[:, :-1]], 1)
    predicting = torch.cat([torch.ones_like(response_mask[:, :1]), response_mask[:, :-1]], 1).bool()
    return out * predicting.view(*predicting.shape, *([1] * (out.dim() - 2)))


def _shared_prompt_logits(model: nn.Module, prompts: Tensor, prompt_mask: Tensor, responses: Tensor,
                          response_mask: Tensor) -> Tensor:
    def forward(ids, mask, positions, cache, last_only):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits, out.past_key_values

    return shared_prompt_outputs(forward, prompts, prompt_mask, responses, response_mask)


def response_logprobs(
    model: nn.Module, prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor,
    temperature: float, with_entropy: bool = False, packed: bool = False, share_prompts: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) of the response tokens under logits / temperature -> (B, R) [and entropy (B, R)].

    Positions outside the response mask hold 0. `packed`: the forward runs on the real tokens only (`pack`).
    `share_prompts` (padded only): each distinct prompt runs once (`shared_prompt_outputs`).
    """
    if share_prompts and not packed:
        logits = _shared_prompt_logits(model, prompts, prompt_mask, responses, response_mask)
    else:
        ids = torch.cat([prompts, responses], 1)  # (B, P+R)
        mask = torch.cat([prompt_mask, response_mask], 1)
        logits = response_logits(model, ids, mask, responses.shape[1], packed)
    logits = logits.float() / temperature  # (B, R, V)
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1) * response_mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * response_mask
    return logp, entropy


def _scalar_model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, score head) of an AutoModelForSequenceClassification, peft-wrapped or not."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix), hf.score


def token_values(model: nn.Module, ids: Tensor, mask: Tensor, packed: bool = False) -> Tensor:
    """Scalar head on every position's hidden state -> (B, T): the critic's V(s_t), 0 at padding. Computed on the
    rows flushed right (`flush_right`), or `packed` into one row of the real tokens (`pack`)."""
    backbone, head = _scalar_model_parts(model)
    if not packed:
        flushed, fmask, index = flush_right(ids, mask)
        hidden = backbone(input_ids=flushed, attention_mask=fmask, position_ids=position_ids(fmask),
                          use_cache=False).last_hidden_state
        values = head(hidden).squeeze(-1).float()  # (B, W)
        return torch.where(index >= 0, values.gather(1, index.clamp(min=0)), 0.0)
    flat, pos, index = pack(ids, mask)
    values = head(backbone(input_ids=flat, position_ids=pos, use_cache=False).last_hidden_state)[0, :, 0].float()
    return values.new_zeros(index.shape).index_put((index >= 0).nonzero(as_tuple=True), values)


def response_values(model: nn.Module, prompts: Tensor, prompt_mask: Tensor, responses: Tensor,
                    response_mask: Tensor, packed: bool = False, share_prompts: bool = False) -> Tensor:
    """The critic's V(s_t) before each response token -> (B, R): the state that predicts response token t.
    `share_prompts` (padded only): each distinct prompt runs once (`shared_prompt_outputs`)."""
    if share_prompts and not packed:
        backbone, head = _scalar_model_parts(model)

        def forward(ids, mask, positions, cache, last_only):
            out = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True)
            hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
            return head(hidden).squeeze(-1).float(), out.past_key_values

        return shared_prompt_outputs(forward, prompts, prompt_mask, responses, response_mask)
    P = prompts.shape[1]
    values = token_values(model, torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1),
                          packed)
    return values[:, P - 1 : -1]


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of each row's last real token."""
    T = mask.shape[1]
    return (mask.long() * torch.arange(T, device=mask.device)).argmax(-1)


def sequence_scores(model: nn.Module, ids: Tensor, mask: Tensor, packed: bool = False) -> Tensor:
    """Reward read at the last non-pad token (detail 7) -> (B,), before the normalising bias."""
    values = token_values(model, ids, mask, packed)  # (B, T)
    return values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1)


def response_scores(model: nn.Module, prompts: Tensor, prompt_mask: Tensor, responses: Tensor,
                    response_mask: Tensor, packed: bool = False, share_prompts: bool = False) -> Tensor:
    """`sequence_scores` of left-padded prompts followed by their responses -> (B,). `share_prompts` (padded only):
    each distinct prompt runs once (`response_values` on one more, padding, column: the state before it is the last
    response token's, or the prompt's last for an empty response)."""
    if share_prompts and not packed:
        values = response_values(model, prompts, prompt_mask, F.pad(responses, (0, 1)), F.pad(response_mask, (0, 1)),
                                 share_prompts=True)  # (B, R + 1)
        return values.gather(1, response_mask.sum(-1, keepdim=True).long()).squeeze(1)
    return sequence_scores(model, torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1),
                           packed)


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
    backbone, head = _scalar_model_parts(model)
    shared = shared_starts(chosen, rejected)
    if shared is None:
        ids, mask = pad_right([*chosen, *rejected], pad_id)
        scores = sequence_scores(model, ids, mask)
        return scores[: len(chosen)], scores[len(chosen):]
    prefix, prefix_mask = pad_left([c[:n] for c, n in zip(chosen, shared)], pad_id)
    cache = backbone(input_ids=prefix, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                     use_cache=True).past_key_values
    cache.batch_repeat_interleave(2)  # rows c0, r0, c1, r1, ...
    ids, mask = pad_right([side[n:] for c, r, n in zip(chosen, rejected, shared) for side in (c, r)], pad_id)
    start = torch.tensor(shared).repeat_interleave(2).unsqueeze(1)  # positions go on from each prefix's end
    hidden = backbone(input_ids=ids, attention_mask=torch.cat([prefix_mask.repeat_interleave(2, 0), mask], 1),
                      position_ids=start + torch.arange(ids.shape[1]), past_key_values=cache,
                      use_cache=True).last_hidden_state
    last = hidden[torch.arange(ids.shape[0]), mask.sum(-1) - 1]  # each side's last real token (detail 7)
    scores = head(last).squeeze(-1).float()
    return scores[0::2], scores[1::2]


@torch.no_grad()
def sample(
    model: nn.Module, prompts: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int,
    temperature: float, top_p: float, greedy: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample one response per prompt row with transformers' generate -> responses, mask (B, max_new_tokens).

    The sampling distribution is exactly softmax(logits / T) (when top_p = 1), the one the log-probs are computed
    under: top_k is off, and the checkpoint's generation_config adds no logits processor (`sampling_only_config`).
    """
    responses, mask, _ = _generate(model, prompts, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p,
                                   greedy, with_logprobs=False)
    return responses, mask


def sample_with_logprobs(
    model: nn.Module, prompts: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int,
    temperature: float, top_p: float, share_prompts: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """`sample`, and the behaviour log-probs log softmax(logits / T) of each sampled token read off the logits
    generate computed to sample it -> responses, mask, log-probs (B, max_new_tokens), 0 after EOS.

    No second forward pass over prompt and response: generate's KV-cached logits equal a full forward's
    (`response_logprobs`, what the learner and the reference compute) up to float error (tests/test_sequences.py).
    `share_prompts`: each distinct prompt's prefill runs once (`prefill_distinct_prompts`) where it may
    (`prefills_prompts_once`).
    """
    return _generate(model, prompts, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p, False,
                     with_logprobs=True, share_prompts=share_prompts)


def prefills_prompts_once(model: nn.Module, prompts: Tensor, prompt_mask: Tensor) -> bool:
    """Whether `_generate` with `share_prompts` runs each distinct prompt once here: a prompt repeats (the n samples
    of one), there is a column to cache before the last one (which generate runs itself), the cache keeps every
    prompt position (`prefix_runs_once_exactly`), and generate would use the plain dynamic cache we hand it: not
    with a cache implementation of its own (static, offloaded: it refuses a given cache), nor with a chunked
    prefill (which would run the whole prompt again over ours), nor on models without a KV cache (Mamba-like)."""
    gen = getattr(model, "generation_config", None)
    plain_cache = (gen is not None and getattr(gen, "cache_implementation", None) is None
                   and getattr(gen, "prefill_chunk_size", None) is None
                   and "mamba" not in type(model).__name__.lower() and model._supports_default_dynamic_cache())
    return (prompts.shape[1] > 1 and plain_cache and repeats_a_prompt(prompts, prompt_mask)
            and prefix_runs_once_exactly(model))


def prefill_distinct_prompts(model: nn.Module, prompts: Tensor, prompt_mask: Tensor):
    """The KV cache of every row's prompt but its last column, each distinct prompt run once through the decoder
    (no head) and its cache copied to its samples' rows.

    Given to generate as `past_key_values`, generate runs only the last prompt column and the response: with n
    samples per prompt the prefill, most of a short response's generation, costs one prompt instead of n. The
    positions are generate's own (`position_ids`); causal attention keeps a prompt's keys and values the same
    however many rows follow it, so the logits are those of generate's own prefill up to float rounding."""
    P = prompts.shape[1]
    distinct, inverse = torch.unique(torch.cat([prompts, prompt_mask], 1), dim=0, return_inverse=True)
    ids, mask = distinct[:, : P - 1], distinct[:, P : 2 * P - 1]
    cache = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                             use_cache=True).past_key_values
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise TypeError(f"{type(model).__name__} returned a {type(cache).__name__} where a prompt's cache was expected; "
                        "set ppo.share_prompts false")
    cache.batch_select_indices(inverse)
    return cache


def sampling_only_config(max_new_tokens: int, eos_id: int, pad_id: int, temperature: float, top_p: float,
                         greedy: bool, with_logits: bool) -> GenerationConfig:
    """The `transformers.GenerationConfig` of every generate call: softmax(logits / T), cut to the nucleus when
    top_p < 1 (top-k off), or the argmax, for `max_new_tokens` tokens or up to EOS; no other logits processor.

    A checkpoint's own generation_config.json (repetition_penalty, no_repeat_ngram_size, suppress_tokens,
    bad_words_ids, min_p, min_new_tokens, forced tokens, top_k 50 by default, ...) would otherwise shape what is
    sampled, while the behaviour log-probs, the learner and the reference assume this distribution."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_id, pad_token_id=pad_id,
                            use_cache=True, return_dict_in_generate=True, output_logits=with_logits, **sampling)


@contextmanager
def _only_this_generation_config(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Generate with `config` alone. transformers (5.x `_prepare_generation_config`) fills every field a passed
    config leaves unset (None) from `model.generation_config`, the checkpoint's file, and copies its custom entries;
    only then from its library defaults, which are neutral but for top_k 50 (set 0 above). A processor such as
    suppress_tokens is on whenever its field is not None, so no value set in `config` can turn the file's off:
    for the call the model's generation_config is `config` itself, and the fields left unset take the library
    defaults. Under peft, the transformers model underneath generates and is the one whose config is read."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "generate" in vars(hf):  # from_pretrained(trust_remote_code=True) of a repo with custom_generate/generate.py
        raise ValueError(f"{type(hf).__name__} has a generate of its own (custom_generate): its sampling distribution "
                         "is not softmax(logits / T), which the behaviour log-probs assume")
    own = hf.generation_config
    hf.generation_config = config
    try:
        yield
    finally:
        hf.generation_config = own


def _generate(model: nn.Module, prompts: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
              temperature: float, top_p: float, greedy: bool, with_logprobs: bool, share_prompts: bool = False
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    kwargs = {}
    if share_prompts and prefills_prompts_once(model, prompts, prompt_mask):
        kwargs["past_key_values"] = prefill_distinct_prompts(model, prompts, prompt_mask)
    config = sampling_only_config(max_new_tokens, eos_id, pad_id, temperature, top_p, greedy, with_logprobs)
    with _only_this_generation_config(model, config):
        out = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=config, **kwargs)
    responses = out.sequences[:, prompts.shape[1]:]
    logprobs = None
    if with_logprobs:  # out.logits: one (B, V) tensor per generated position, before temperature
        logprobs = torch.stack([F.log_softmax(step.float() / temperature, -1).gather(-1, responses[:, t : t + 1])[:, 0]
                                for t, step in enumerate(out.logits)], 1)
    if responses.shape[1] < max_new_tokens:  # generate stops once every row hit EOS
        grow = max_new_tokens - responses.shape[1]
        responses = F.pad(responses, (0, grow), value=pad_id)
        logprobs = F.pad(logprobs, (0, grow)) if logprobs is not None else None
    responses, mask = truncate_after_eos(responses, eos_id, pad_id)
    return responses, mask, logprobs.masked_fill(mask == 0, 0.0) if logprobs is not None else None
