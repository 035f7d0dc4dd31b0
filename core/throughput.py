"""Model FLOPs utilisation (MFU): the FLOP/s a role's model work needs, against its device's peak.

FLOPs are counted with PaLM's MFU formula (Chowdhery et al. 2022, appendix B): 2 per matmul parameter per token
for a forward pass; a backward pass adds 2 for the gradients that flow through every weight and 2 more per
trainable parameter for the weight gradients (LoRA trains few: its backward costs about one forward, not two);
gradient checkpointing adds the recomputed forward (of the decoder layers). Attention's two matmuls (scores, weighted
sum) count for the query-key pairs a causal model uses, T(T+1)/2 per sequence of T tokens (PaLM counts all T^2). The token embedding is a lookup, not a
matmul; a causal LM's output head (vocabulary x hidden, tied to the embedding or not) counts only on the positions
that go through it: rayrlhf's learner, reference and SFT send only those that predict response tokens.

The peak: a GPU's dense datasheet figure for the dtype (the table below; bf16/fp16 tensor cores, fp32 without
TF32), or a short matmul probe on the role's own threads, once per process, on a CPU or an unknown GPU. Roles
start and take their first turn together, so two probes at once would each see half the machine (and an MFU
above 1 later): probes on a node take turns under a file lock, and the node keeps the highest figure each
(device, dtype, thread count) has reached, which a probe slowed by other work does not lower.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets, most specific name first (`gpu_peak`).
GPU_PEAK_FLOPS = {
    "GH200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
    "L40": {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
}


def gpu_peak(device_name: str, dtype_name: str) -> float | None:
    """The table's peak for a GPU named `device_name` in `dtype_name`, None when the table lacks it. Names match
    as whole words, most specific first: "NVIDIA L40" is not an L4, "NVIDIA H100 PCIe" not an SXM H100."""
    for key, peaks in GPU_PEAK_FLOPS.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name):
            return peaks.get(dtype_name)
    return None


def _embedding_or_head(name: str) -> bool:
    return "embed" in name or ".wte." in name or ".wpe." in name or "lm_head" in name


def matmul_params(named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Parameters that take part in matmuls at every position: all but the token (and position) embeddings and
    a causal LM's output head (`head_params`)."""
    return sum(t.numel() for name, t in named if not _embedding_or_head(name))


def head_params(named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """A causal LM's output head, vocabulary x hidden: `lm_head`, or the token embedding it is tied to."""
    return max((t.numel() for name, t in named if _embedding_or_head(name) and ".wpe." not in name), default=0)


def model_head_params(model: nn.Module) -> tuple[int, int]:
    """(output head parameters, trainable ones among them) of a causal LM, peft-wrapped or not: its training FLOPs
    are `training_flops` of these over the positions that go through the head."""
    named = list(model.named_parameters())
    return head_params(named), head_params((n, p) for n, p in named if p.requires_grad)


def attention_flops(config, lengths: Iterable[int]) -> float:
    """Forward FLOPs of attention's two matmuls (q k^T and the weighted sum of v), over causal sequences of
    `lengths` tokens: 2 x 2 FLOPs per query-key pair per query dimension per layer."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 4.0 * config.num_hidden_layers * heads * head_dim * sum(t * (t + 1) / 2 for t in lengths)


def shared_prefix_work(config, lengths: Sequence[int], prefixes: Sequence[int], groups: Sequence[int] | None
                       ) -> tuple[int, float]:
    """(tokens run through the model, attention forward FLOPs) for sequences of `lengths` whose first
    `prefixes[i]` tokens are run once per `groups[i]` (the n samples of a prompt, the two sides of a comparison:
    `forward.shared_prompt_outputs`, `pair_scores`). `groups` None: every sequence runs whole."""
    if groups is None:
        return sum(lengths), attention_flops(config, lengths)
    once = list({g: n for g, n in zip(groups, prefixes)}.values())
    return (sum(lengths) - sum(prefixes) + sum(once),
            attention_flops(config, lengths) - attention_flops(config, prefixes) + attention_flops(config, once))


def model_params(model: nn.Module) -> tuple[int, int]:
    """(matmul parameters, trainable ones among them) of a model, peft-wrapped or not."""
    named = list(model.named_parameters())
    return matmul_params(named), matmul_params((n, p) for n, p in named if p.requires_grad)


def forward_flops(n_params: int, tokens: int) -> float:
    return 2.0 * n_params * tokens


def training_flops(n_params: int, n_trainable: int, tokens: int, checkpointing: bool = False,
                   frozen_forward: float = 0.0) -> float:
    """Forward + backward (+ the recomputed forward with gradient checkpointing) over `tokens` tokens.
    `frozen_forward`: forward FLOPs of attention's matmuls, which have no weights: their backward computes the
    gradients of both operands (2x their forward)."""
    per_token = 2 * n_params + 2 * n_params + 2 * n_trainable + (2 * n_params if checkpointing else 0)
    return float(per_token) * tokens + frozen_forward * (4 if checkpointing else 3)


def _probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.3, n: int = 1024) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    sync()
    return 2.0 * n**3 * count / (time.perf_counter() - t0)


@functools.cache
def _peak(device_type: str, dtype_name: str, threads: int) -> float:
    dtype = getattr(torch, dtype_name)
    if device_type == "cuda":
        known = gpu_peak(torch.cuda.get_device_name(), dtype_name)
        if known is not None:
            return known
    return node_peak(f"{_device_name(device_type)}|{dtype_name}|{threads} threads",
                     lambda: _probe(torch.device(device_type), dtype))


def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model} x{os.cpu_count()}"


def node_peak(key: str, probe, path: Path | None = None) -> float:
    """`probe()` run while no other process of this node probes (a file lock), and the highest figure `key` has
    reached on this node (kept in `$RAYRLHF_CACHE/peak_flops.json`, default ~/.cache/rayrlhf): a probe slowed
    by other work never lowers the peak that MFU is measured against."""
    import fcntl

    from rayrlhf.core.config import cache_root

    path = path or cache_root() / "peak_flops.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:  # a torn file from an older writer: start again
            known = {}
        best = max(probe(), float(known.get(key, 0.0)))
        known[key] = best
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    return best


def peak_flops(device: str | torch.device, dtype: str = "float32") -> float:
    """Peak FLOP/s of this process's device in `dtype`: the GPU table, else a probe at the current torch threads
    (cached per device, dtype and thread count: the probe costs about 0.3 s once)."""
    device_type = torch.device(device).type
    return _peak(device_type, dtype, torch.get_num_threads() if device_type == "cpu" else 0)


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Share of the peak that `flops` in `seconds` achieved (0 when nothing was timed)."""
    return flops / seconds / peak if seconds > 0 and peak > 0 else 0.0
