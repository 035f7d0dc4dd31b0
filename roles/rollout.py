"""The rollout generator: samples responses with the behaviour policy and records their log-probs.

`RolloutGenerator` holds a backend (`HFBackend` here; `roles.vllm_backend.VLLMBackend` with vLLM) and
the policy version it holds. A weight swap and a generate call never interleave (one call at a time per
worker), so each `RolloutBatch` is produced by exactly the version it records.

A weight load is checked where the weights are used. `HFBackend` samples with the model it copies the weights
into, so the checksum of its parameters after the copy (`load_weights(verify=True)`) reads back what generates.
`VLLMBackend` samples with an engine whose weights it cannot read back: every load runs a probe through the
engine and through the HF copy of the weights, and fails unless their log-probs agree (`last_verify_diff`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from rayrlhf.core.config import LoraConfig, RolloutConfig
from rayrlhf.core.decode import ContinuousDecoder
from rayrlhf.core.experience import RolloutBatch, RolloutRequest, VersionMismatch
from rayrlhf.core.modeling import apply_lora, default_device, load_frozen, lora_parameters
from rayrlhf.core.padding import pad_left
from rayrlhf.core.plan import prompt_ids
from rayrlhf.core.sampling import prefills_prompts_once, sample_with_logprobs
from rayrlhf.core.throughput import head_params, matmul_params, shared_prefix_work
from rayrlhf.core.weight_sync import VersionedChecksum, WeightsPacket, WeightSyncError, checksum, unpack
from rayrlhf.core.work import ModelCost, WorkMeter
from rayrlhf.roles.inflight import InflightEngine


class RolloutBackend(Protocol):
    # max |engine - weights| log-prob of the last probe (vLLM: every full-weight or merged-adapter load; with adapters
    # as LoRA requests, the start's self-test, each load being read back instead); None: no probe
    last_probe_diff: float | None
    model: nn.Module  # the HF model of the weights held (with `adapters`, a peft model over the base)
    adapters: bool  # whether a load takes LoRA matrices only (adapter-only sync) or every weight

    def generate(self, prompts: list[list[int]], seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """-> responses (B, R), response_mask (B, R) cut after EOS, behaviour log-probs (B, R)."""

    def load_weights(self, named: Iterable[tuple[str, Tensor]]) -> None: ...

    def prefill_groups(self, prompts: Tensor, prompt_mask: Tensor) -> list[int] | None:
        """A prompt id per row where `generate` runs each distinct prompt's prefill once, else None."""

    def named_weights(self) -> dict[str, Tensor]: ...


class HFBackend:
    """transformers `generate`; the behaviour log-probs come off the logits it sampled from (no second pass)."""

    def __init__(self, checkpoint: str, cfg: RolloutConfig, dtype: str = "float32", device: str | None = None,
                 share_prompts: bool = False, lora: LoraConfig | None = None):
        self.device = device or default_device()
        self.model, self.tokenizer = load_frozen(checkpoint, "causal_lm", dtype, self.device)
        if lora is not None:  # adapter-only sync: the base stays, each version's LoRA matrices are loaded into it
            self.model = apply_lora(self.model, lora, "CAUSAL_LM").to(self.device).eval()
        self.adapters = lora is not None
        self.cfg, self.share_prompts = cfg, share_prompts
        self.last_probe_diff = None  # the model that generates is the one loaded: nothing to probe

    def prefill_groups(self, prompts: Tensor, prompt_mask: Tensor) -> list[int] | None:
        """A prompt id per row where `generate` prefills each distinct prompt once (`prefill_distinct_prompts`),
        None where every row runs its own."""
        if self.share_prompts and prefills_prompts_once(self.model, prompts, prompt_mask):
            return prompt_ids(prompts, prompt_mask)
        return None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> tuple[Tensor, Tensor, Tensor]:
        tok = self.tokenizer
        ids, mask = (t.to(self.device) for t in pad_left(prompts, tok.pad_token_id))
        torch.manual_seed(seed)
        responses, rmask, logprobs = sample_with_logprobs(
            self.model, ids, mask, max_new_tokens=self.cfg.max_new_tokens, eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
            share_prompts=self.share_prompts)
        return responses.cpu(), rmask.cpu(), logprobs.cpu()

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, Tensor]]) -> None:
        """Copy into the model that generates (with adapter-only sync, into its LoRA matrices): no probe, its
        parameters are the engine's (checksum them)."""
        params = self.named_weights()
        seen = set()
        for name, t in named:
            if name not in params:
                raise KeyError(f"weight {name!r} is not a parameter of the rollout model")
            params[name].copy_(t)
            seen.add(name)
        missing = set(params) - seen
        if missing:
            raise KeyError(f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[:3]}")

    def named_weights(self) -> dict[str, Tensor]:
        """What a sync loads: the LoRA matrices with adapter-only sync, else every parameter."""
        return dict(lora_parameters(self.model)) if self.adapters else dict(self.model.named_parameters())


class RolloutGenerator:
    """One rollout worker: n samples per prompt, truncated after EOS, tagged with the weight version.

    With `rollout.inflight` (HF backend) the worker generates in a decode loop of its own (`InflightEngine`):
    generate calls and weight loads arrive concurrently (a threaded actor), loads are applied between decode
    steps, and every token carries the version that sampled it (`RolloutBatch.token_versions`)."""

    def __init__(self, checkpoint: str, cfg: RolloutConfig, worker_index: int = 0, dtype: str = "float32",
                 share_prompts: bool = False, lora: LoraConfig | None = None, max_rows: int = 64,
                 wait_s: float = 600.0, restarted: bool = False):
        if cfg.backend == "vllm":
            from rayrlhf.roles.vllm_backend import VLLMBackend

            try:  # the engine is probed against the checkpoint once it starts
                self.backend: RolloutBackend = VLLMBackend(checkpoint, cfg, dtype, lora=lora, inflight=cfg.inflight)
            except WeightSyncError as e:
                raise WeightSyncError(f"rollout worker {worker_index}, weights v0: {e}") from e
        else:
            self.backend = HFBackend(checkpoint, cfg, dtype, share_prompts=share_prompts, lora=lora)
        self.worker_index = worker_index
        self.version = 0
        self.dtype = dtype
        # vLLM with tensor parallelism splits each forward over this many GPUs: MFU is against all their peaks
        self.devices = cfg.tensor_parallel_size if cfg.backend == "vllm" else 1
        # every weight that computes (the engine's HF copy with vLLM; the base and its adapters with adapter sync)
        named = list(self.backend.model.named_parameters())
        self.cost = ModelCost(AutoConfig.from_pretrained(checkpoint), matmul_params(named), 0, head_params(named), 0)
        self.busy_s = 0.0  # seconds generating (and loading, in-flight): 1 - busy / wall is the worker's idle share
        self.engine = None
        if cfg.inflight:
            tok = self.backend.tokenizer

            def decoder() -> ContinuousDecoder:
                if cfg.backend == "vllm":  # the engine's own step loop (one engine: one decoder)
                    from rayrlhf.roles.vllm_inflight import VLLMStepDecoder

                    return VLLMStepDecoder(self.backend, cfg.inflight_kv)
                return ContinuousDecoder(self.backend.model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                         temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                         kv=cfg.inflight_kv)

            self.engine = InflightEngine(decoder, max_rows, cfg.inflight_deterministic, wait_s, restarted)

    def leave_order(self) -> None:
        """In-flight, deterministic: this worker's requests run on arrival from now on (`InflightEngine.leave_order`)."""
        if self.engine is not None:
            self.engine.leave_order()

    def settled_version(self) -> int:
        """The version held once the calls before this one are done (in-flight, calls run concurrently: this one
        waits for the decode loop to be idle)."""
        if self.engine is not None:
            self.engine.wait_idle()
        return self.version

    def busy_seconds(self) -> float:
        return self.engine.busy_s if self.engine is not None else self.busy_s

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        if self.engine is not None:
            return self._generate_inflight(req)
        if req.version is not None and req.version != self.version:
            raise VersionMismatch(f"rollout worker {self.worker_index} holds policy v{self.version}, batch {req.batch_id} "
                                  f"needs v{req.version}")
        # the GPUs a forward is split over (vLLM's tensor parallelism) have a peak each
        meter = WorkMeter("cuda" if torch.cuda.is_available() else "cpu", self.dtype, self.devices)
        responses, rmask, logprobs = self.backend.generate(req.prompts, req.seed)
        meter.stop_clock()
        prompts, pmask = pad_left(req.prompts, self.backend.tokenizer.pad_token_id)
        # prefill and decode: a forward pass of each token, a shared prefill's once per distinct prompt (all of the
        # prompt but the last token, which each row runs); the head makes each sampled token's logits
        plens, lengths = pmask.sum(-1), (pmask.sum(-1) + rmask.sum(-1)).tolist()
        groups = self.backend.prefill_groups(prompts, pmask)
        meter.forward(self.cost, *shared_prefix_work(self.cost.config, lengths, (plens - 1).tolist() if groups else
                                                     [0] * len(lengths), groups), int(rmask.sum()))
        work = meter.stop()
        self.busy_s += work.seconds
        return RolloutBatch(batch_id=req.batch_id, shard=req.shard, worker=self.worker_index,
                            policy_version=self.version, prompt_indices=list(req.prompt_indices), prompts=prompts,
                            prompt_mask=pmask, responses=responses, response_mask=rmask, logprobs=logprobs,
                            seconds=work.seconds, mfu=work.mfu, engine_probe_diff=self.last_verify_diff)

    def _generate_inflight(self, req: RolloutRequest) -> RolloutBatch:
        """The request's rows from the decode loop, each token with its version; the batch's version is the
        oldest token's. MFU is not measured: a request's decode steps are shared with the others in the loop."""
        got = self.engine.generate(req)
        s = got.sampled
        prompts, pmask = pad_left(req.prompts, self.backend.tokenizer.pad_token_id)
        real = s.versions[s.response_mask.bool()]
        oldest = int(real.min()) if real.numel() else self.engine.version
        return RolloutBatch(batch_id=req.batch_id, shard=req.shard, worker=self.worker_index, policy_version=oldest,
                            prompt_indices=list(req.prompt_indices), prompts=prompts, prompt_mask=pmask,
                            responses=s.responses, response_mask=s.response_mask, logprobs=s.logprobs,
                            seconds=got.seconds, mfu=None, token_versions=s.versions, started=got.started)

    def load_weights(self, packet: WeightsPacket, verify: bool = False, after_requests: int | None = None) -> float:
        """`_load_weights`; in-flight, run by the decode loop between two steps (deterministic mode: once the
        requests sent before it, `after_requests` of them, are done, or when a request's schedule asks for it)."""
        if self.engine is None:
            seconds = self._load_weights(packet, verify)
            self.busy_s += seconds  # as the decode loop counts its loads: busy either way
            return seconds
        return self.engine.load(packet.version, lambda: self._load_weights(packet, verify), after_requests)

    def _load_weights(self, packet: WeightsPacket, verify: bool = False) -> float:
        """Swap in `packet`'s weights; with `verify`, compare the checksum of the weights held (the generating
        model's for HF, the engine's HF copy for vLLM, whose engine is probed on every load whatever `verify`).
        An adapter-only packet is always verified, before the load (the matrices as they arrived, a few MB: a packet
        changed on the way never reaches the engine) and after it (the matrices the worker holds; the HF backend
        computes with them, vLLM's backend reads them back from the engine's LoRA slot or probes the engine it
        merged them into). The worker's version changes only once the load is verified. Returns seconds taken."""
        t0 = time.perf_counter()
        where = f"rollout worker {self.worker_index}, weights v{packet.version}"
        if packet.adapters != self.backend.adapters:
            held = "its base with LoRA adapters" if packet.adapters is False else "full weights"
            raise WeightSyncError(f"{where}: the learner sent {'adapters only' if packet.adapters else 'full weights'}, "
                                  f"the worker holds {held} (rollout.lora_sync differs between them)")
        if packet.adapters:
            arrived = checksum(unpack(packet.layouts, packet.buckets))
            if arrived != packet.checksum:
                raise WeightSyncError(f"{where}: the adapters arrived with checksum {arrived[:12]}, the learner sent "
                                      f"{packet.checksum[:12]}")
        try:
            self.backend.load_weights(unpack(packet.layouts, packet.buckets))
        except (WeightSyncError, KeyError) as e:
            raise WeightSyncError(f"{where}: {e}") from e
        if verify or packet.adapters:
            got = checksum(self.backend.named_weights().items())
            if got != packet.checksum:
                raise RuntimeError(f"rollout worker {self.worker_index}: weights after sync v{packet.version} "
                                   f"have checksum {got[:12]}, learner sent {packet.checksum[:12]}")
        self.version = packet.version  # only once verified: a batch tagged with it was made by it
        return time.perf_counter() - t0

    @property
    def last_verify_diff(self) -> float | None:
        """The last load's engine probe (VLLMBackend): max |engine - HF copy of the weights| log-prob; None (HF)."""
        return self.backend.last_probe_diff

    def weights_checksum(self) -> VersionedChecksum:
        def read() -> VersionedChecksum:
            return VersionedChecksum(self.version, checksum(self.backend.named_weights().items()))

        return self.engine.locked(read) if self.engine is not None else read()
