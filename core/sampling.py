"""Sampling responses with transformers' generate from exactly softmax(logits / T), with behaviour log-probs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rayrlhf.core.padding import position_ids, truncate_after_eos
from rayrlhf.core.plan import may_share_prefix, repeats_a_prompt
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import GenerationConfig


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
    prompt position (`plan.may_share_prefix`), and generate would use the plain dynamic cache we hand it: not
    with a cache implementation of its own (static, offloaded: it refuses a given cache), nor with a chunked
    prefill (which would run the whole prompt again over ours), nor on models without a KV cache (Mamba-like)."""
    hf = _transformers_model(model)
    gen = getattr(hf, "generation_config", None)
    plain_cache = (gen is not None and getattr(gen, "cache_implementation", None) is None
                   and getattr(gen, "prefill_chunk_size", None) is None
                   and "mamba" not in type(hf).__name__.lower() and hf._supports_default_dynamic_cache())
    return (prompts.shape[1] > 1 and plain_cache and repeats_a_prompt(prompts, prompt_mask)
            and may_share_prefix([model]))


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model itself (LoRA layers injected) under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
    # the decoder without its head (a peft model's `base_model` is its LoRA wrapper, which runs the head too)
    decoder = _transformers_model(model).base_model
    cache = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True).past_key_values
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise TypeError(f"{type(model).__name__} returned a {type(cache).__name__} where a prompt's cache was expected; "
                        "set rollout.share_prompts false")
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
