"""Model FLOPs and MFU (core.throughput), counted by hand."""

from __future__ import annotations

import time

import pytest
import torch

from rayrlhf.core import throughput as tp


def test_flops_by_hand():
    # 10 matmul parameters, 3 tokens: forward 2 per parameter per token
    assert tp.forward_flops(10, 3) == 60
    # full fine-tuning: forward 2 + gradients through the weights 2 + weight gradients 2 = 6 per parameter
    assert tp.training_flops(10, 10, 3) == 180
    # LoRA-like: 1 trainable of 10: 2 + 2 + 2 * 1 / 10 per parameter
    assert tp.training_flops(10, 1, 3) == (20 + 20 + 2) * 3
    # gradient checkpointing recomputes the forward
    assert tp.training_flops(10, 10, 3, checkpointing=True) == 240
    assert tp.mfu(100.0, 2.0, 100.0) == 0.5 and tp.mfu(100.0, 0.0, 100.0) == 0.0


def test_a_shared_prefix_is_counted_once():
    from types import SimpleNamespace

    one = SimpleNamespace(num_attention_heads=1, head_dim=1, hidden_size=1, num_hidden_layers=1)
    # two samples of one 3-token prompt with responses of 2 and 3 tokens: the prompt's 3 tokens run once; its
    # 6 causal pairs once, then 4 + 5 and 4 + 5 + 6 pairs for the responses' tokens: 30 pairs, 4 FLOPs each
    assert tp.shared_prefix_work(one, [5, 6], [3, 3], [0, 0]) == (8, 120.0)
    assert tp.shared_prefix_work(one, [5, 6], [3, 3], [0, 1]) == (11, 4.0 * (15 + 21))  # two prompts
    assert tp.shared_prefix_work(one, [5, 6], [3, 3], None) == (11, 4.0 * (15 + 21))


def test_matmul_params_leave_out_the_embedding():
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(50, 4)
    model.proj = torch.nn.Linear(4, 4, bias=False)
    model.proj.weight.requires_grad_(False)
    model.head = torch.nn.Linear(4, 2)
    assert tp.model_params(model) == (16 + 8 + 2, 8 + 2)


def test_a_causal_lms_head_counts_apart_on_the_positions_that_use_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    named = list(model.named_parameters())
    # per layer: q, o 16x16; k, v 16x8 (2 of 4 heads); gate, up, down 16x32; the norms' weights
    per_layer = 2 * 256 + 2 * 128 + 3 * 512 + 2 * 16
    assert tp.matmul_params(named) == 2 * per_layer + 16  # + the final norm; no embedding, no head
    assert tp.head_params(named) == 50 * 16
    tied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True}))
    assert tp.head_params(list(tied.named_parameters())) == 50 * 16  # the embedding it shares
    for p in model.parameters():
        p.requires_grad_(False)
    assert tp.model_head_params(model) == (800, 0)
    # attention: 2 layers x 4 heads x head_dim 4, causal pairs 3 + 1 for sequences of 2 and 1 tokens, 4 FLOPs each
    assert tp.attention_flops(config, [2, 1]) == 4 * 2 * 16 * (3 + 1)
    # its backward computes both operands' gradients: 3x the forward (4x with the recomputed forward)
    assert tp.training_flops(10, 1, 3, frozen_forward=7.0) == (20 + 20 + 2) * 3 + 21
    assert tp.training_flops(10, 1, 3, checkpointing=True, frozen_forward=7.0) == (20 + 20 + 2 + 20) * 3 + 28


def test_peak_is_a_probe_on_cpu_and_the_datasheet_on_a_known_gpu(monkeypatch):
    cpu = tp.peak_flops("cpu", "float32")
    assert cpu > 1e8 and tp.peak_flops("cpu", "float32") == cpu  # measured once per thread count
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert tp._peak.__wrapped__("cuda", "bfloat16", 0) == pytest.approx(989e12)


def test_gpu_names_match_the_table_as_whole_words_most_specific_first():
    assert tp.gpu_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12  # SXM
    assert tp.gpu_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert tp.gpu_peak("NVIDIA H100 NVL", "float32") == 60e12
    assert tp.gpu_peak("NVIDIA H200 NVL", "bfloat16") == 835e12 and tp.gpu_peak("NVIDIA H200", "bfloat16") == 989e12
    assert tp.gpu_peak("NVIDIA GH200 480GB", "bfloat16") == 989e12
    assert tp.gpu_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert tp.gpu_peak("NVIDIA L40", "bfloat16") == 181e12  # not an L4, nor an L40S
    assert tp.gpu_peak("NVIDIA L40S", "bfloat16") == 362e12 and tp.gpu_peak("NVIDIA L4", "bfloat16") == 121e12
    assert tp.gpu_peak("NVIDIA GeForce RTX 4090", "bfloat16") is None  # not in the table: probed


def test_a_node_keeps_the_highest_peak_a_probe_reached(tmp_path):
    """Probes take turns under a file lock; one slowed by other work (here: half) never lowers the node's peak."""
    path = tmp_path / "peak_flops.json"
    assert tp.node_peak("cpu|float32|2 threads", lambda: 80e9, path) == 80e9
    assert tp.node_peak("cpu|float32|2 threads", lambda: 40e9, path) == 80e9  # contended probe
    assert tp.node_peak("cpu|float32|2 threads", lambda: 90e9, path) == 90e9
    assert tp.node_peak("cpu|float32|1 threads", lambda: 45e9, path) == 45e9  # its own key
    import json

    assert json.loads(path.read_text()) == {"cpu|float32|2 threads": 90e9, "cpu|float32|1 threads": 45e9}


def test_probes_on_a_node_take_turns(tmp_path):
    """Two processes probing at once: the second probe starts only after the first one ended."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_probe_and_log, args=(str(tmp_path / "peak.json"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    (a0, a1), (b0, b1) = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert a1 <= b0  # no overlap


def _probe_and_log(path: str, log: str) -> None:
    from pathlib import Path

    def probe() -> float:
        t0 = time.time()
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write(f"{t0} {time.time()}\n")
        return 1.0

    tp.node_peak("k", probe, Path(path))
