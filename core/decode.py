"""Step-wise sampling with continuous batching: the decode loop behind in-flight weight updates.

`ContinuousDecoder` runs one decode step at a time over every row it holds, in one batched forward over one KV
cache (transformers' `DynamicCache`, rows left-padded to a common width). Requests join between steps (their
prompts prefilled and their cache rows merged into the batch's), leave once all their rows are done (their cache
rows dropped), and the model's weights may change between two steps (`weights_changed`): sequences in progress
go on under the new version, each token tagged with the version that sampled it.

After a weight change the rows' keys and values were computed by the old weights. Two choices (`kv`):
- `recompute` (default): every row's prompt and response so far is run again through the new weights (one
  prefill), so each token's recorded log-prob is exactly log pi_v(token | prefix) for its version v, which is what
  the learner computes when it recomputes at that version;
- `keep` (PipelineRL's choice): the cache stays; a token sampled after the change comes from the new weights
  attending to keys and values of the old ones, a distribution that is neither version's. Its recorded log-prob is
  still the true behaviour probability (what importance weights need), but the learner cannot recompute it.

Sampling matches transformers' `generate` (multinomial over softmax(logits / T), one draw per row and step,
finished rows included): a request sampled alone with the same seed gets generate's tokens. Each request
draws from its own `torch.Generator`, so what it samples does not depend on which other requests share its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrlhf.core.padding import pad_left, position_ids

KVAfterUpdate = Literal["recompute", "keep"]


@dataclass
class Row:
    """One sequence: its prompt, the tokens sampled so far with their behaviour log-probs and policy versions."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.tokens


@dataclass
class DecodeRequest:
    """Rows that join together and finish together (a shard: its prompts' samples), with their own generator."""

    key: object
    rows: list[Row]
    generator: torch.Generator
    steps: int = 0  # decode steps run

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rows)


@dataclass(frozen=True)
class Sampled:
    """A finished request's responses, right-padded to `max_new_tokens`: tokens and mask (cut after EOS), behaviour
    log-probs (0 on padding) and the policy version of every token (-1 on padding), each (B, R)."""

    responses: Tensor
    response_mask: Tensor
    logprobs: Tensor
    versions: Tensor


class ContinuousDecoder:
    """Decode steps over the rows of every request added, in one forward each; see the module docstring."""

    def __init__(self, model: nn.Module, *, eos_id: int, pad_id: int, temperature: float, max_new_tokens: int,
                 kv: KVAfterUpdate = "recompute", version: int = 0):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.temperature, self.max_new_tokens, self.kv = temperature, max_new_tokens, kv
        self.version = version
        self.requests: list[DecodeRequest] = []
        self.active: list[Row] = []  # the unfinished rows, in cache order
        self.cache = None  # DynamicCache of every active row's tokens but the one it feeds next
        self.mask: Tensor | None = None  # (B, T): which cache columns are real
        self.forward_tokens = 0  # tokens run through the model (prefills and decode steps), for throughput

    @property
    def rows(self) -> list[Row]:
        """The rows in the forward, in cache order: the unfinished ones (a finished row leaves at once, its
        request's other rows go on)."""
        return self.active

    def __len__(self) -> int:
        return len(self.active)

    @torch.no_grad()
    def add(self, key: object, prompts: list[list[int]], seed: int) -> DecodeRequest:
        """Join `prompts` (one row each) to the batch: their prompts but the last token are prefilled now."""
        if any(len(p) < 2 for p in prompts):
            raise ValueError("the decode loop needs prompts of at least 2 tokens (one to cache, one to feed)")
        req = DecodeRequest(key, [Row(list(p)) for p in prompts], torch.Generator().manual_seed(seed))
        cache, mask = self._prefill([row.ids[:-1] for row in req.rows])
        self._merge(cache, mask)
        self.active += req.rows
        self.requests.append(req)
        return req

    @torch.no_grad()
    def step(self) -> list[DecodeRequest]:
        """One token for every unfinished row; returns the requests that finished (removed from the batch)."""
        if not self.active:
            return []
        rows = self.active
        feed = torch.tensor([[row.ids[-1]] for row in rows])
        mask = torch.cat([self.mask, torch.ones(len(rows), 1, dtype=self.mask.dtype)], 1)
        positions = torch.tensor([[len(row.ids) - 1] for row in rows])
        device = self._device()
        out = self.model(input_ids=feed.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         past_key_values=self.cache, use_cache=True)
        self.cache, self.mask = out.past_key_values, mask
        self.forward_tokens += len(rows)
        logprobs = F.log_softmax(out.logits[:, -1].float().cpu() / self.temperature, -1)
        at = {id(row): i for i, row in enumerate(rows)}
        for req in self.requests:
            self._sample(req, logprobs, at)
        self._drop([row for row in rows if row.done])
        finished = [req for req in self.requests if req.done]
        self.requests = [req for req in self.requests if not req.done]
        return finished

    @torch.no_grad()
    def weights_changed(self, version: int) -> None:
        """The model now holds `version`: later tokens are tagged with it; with `recompute`, every row's cache is
        computed again by the new weights."""
        self.version = version
        if self.kv == "recompute" and self.active:
            self.cache, self.mask = self._prefill([row.ids[:-1] for row in self.active])

    def result(self, req: DecodeRequest) -> Sampled:
        return sampled(req.rows, self.max_new_tokens, self.pad_id)

    # --- internals --------------------------------------------------------------------------------

    def _sample(self, req: DecodeRequest, logprobs: Tensor, at: dict[int, int]) -> None:
        """One multinomial draw per row from the request's generator, finished rows included (as generate draws
        for them, from a one-hot stand-in: they are no longer computed), so a request's tokens depend on its seed
        and logits only."""
        pad = F.one_hot(torch.tensor(self.pad_id), logprobs.shape[-1]).to(logprobs.dtype)
        probs = torch.stack([pad if row.done else logprobs[at[id(row)]].exp() for row in req.rows])
        tokens = torch.multinomial(probs, 1, generator=req.generator)[:, 0].tolist()
        req.steps += 1
        for row, token in zip(req.rows, tokens):
            if row.done:
                continue
            row.tokens.append(token)
            row.logprobs.append(logprobs[at[id(row)], token].item())
            row.versions.append(self.version)
            row.done = token == self.eos_id or len(row.tokens) == self.max_new_tokens

    def _prefill(self, seqs: list[list[int]]):
        """The KV cache of `seqs` (left-padded) and its column mask."""
        ids, mask = pad_left(seqs, self.pad_id)
        device = self._device()
        out = self._decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=position_ids(mask).to(device), use_cache=True)
        self.forward_tokens += int(mask.sum())
        from transformers.cache_utils import DynamicLayer

        layers = getattr(out.past_key_values, "layers", None)
        if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            raise TypeError(f"{type(self.model).__name__}'s KV cache is not made of plain dynamic layers (sliding "
                            "window, recurrent state?): the in-flight decode loop cannot merge and trim its rows; "
                            "set rollout.inflight false")
        return out.past_key_values, mask

    def _merge(self, cache, mask: Tensor) -> None:
        """Append the rows of (`cache`, `mask`) to the batch's, left-padding the narrower to the wider."""
        if not self.active:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_columns(mine.keys, width), _pad_columns(new.keys, width)])
            mine.values = torch.cat([_pad_columns(mine.values, width), _pad_columns(new.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))])

    def _drop(self, done: list[Row]) -> None:
        """Remove the rows `done` from the forward, and the cache columns no row left uses."""
        if not done:
            return
        gone = {id(row) for row in done}
        keep = [i for i, row in enumerate(self.active) if id(row) not in gone]
        self.active = [self.active[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep)
        self.mask = self.mask[index]
        first = int((self.mask.sum(0) > 0).nonzero()[0])  # columns before it are padding in every row left
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, first:]
            layer.values = layer.values[index.to(layer.values.device), :, first:]

    def _decoder(self) -> nn.Module:
        """The model without its head: a prefill needs keys and values only (under peft, its LoRA layers stay)."""
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return hf.base_model

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def sampled(rows: list[Row], max_new_tokens: int, pad_id: int) -> Sampled:
    """Finished rows as right-padded tensors (`Sampled`)."""
    R, n = max_new_tokens, len(rows)
    out = Sampled(torch.full((n, R), pad_id, dtype=torch.long), torch.zeros(n, R, dtype=torch.long),
                  torch.zeros(n, R), torch.full((n, R), -1, dtype=torch.long))
    for i, row in enumerate(rows):
        k = len(row.tokens)
        out.responses[i, :k] = torch.tensor(row.tokens)
        out.response_mask[i, :k] = 1
        out.logprobs[i, :k] = torch.tensor(row.logprobs)
        out.versions[i, :k] = torch.tensor(row.versions)
    return out


def _pad_columns(t: Tensor, width: int) -> Tensor:
    """(B, H, T, D) keys or values left-padded with zeros to `width` columns (masked out by the attention mask)."""
    return F.pad(t, (0, 0, width - t.shape[2], 0))
