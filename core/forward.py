"""One forward of a model over prompt + response rows: log-probs, values and scores, padded or packed.

Every role computes log-probs with `response_logprobs`, from logits divided by the sampling temperature
(detail 11), so the generator, the reference and the learner agree exactly for the same weights. Rows run
flushed right (`padding.flush_right`), packed into one row (`padding.pack`), or with each distinct prompt run
once (`shared_prompt_outputs`); `plan.ForwardPlan` decides which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rayrlhf.core.padding import flush_right, last_token_index, pack, position_ids
from torch import Tensor, nn


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


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (a sharded model's: its local shards'), so its inputs go there; the CPU for
    a module without parameters (a stand-in in tests)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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


def scalar_model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, score head) of an AutoModelForSequenceClassification, peft-wrapped or not."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix), hf.score


def token_values(model: nn.Module, ids: Tensor, mask: Tensor, packed: bool = False) -> Tensor:
    """Scalar head on every position's hidden state -> (B, T): the critic's V(s_t), 0 at padding. Computed on the
    rows flushed right (`flush_right`), or `packed` into one row of the real tokens (`pack`)."""
    backbone, head = scalar_model_parts(model)
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
        backbone, head = scalar_model_parts(model)

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
