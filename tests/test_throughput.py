"""Model FLOPs and MFU (core.throughput), counted by hand."""

from __future__ import annotations

import pytest
import torch

from core import throughput as tp


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


def test_matmul_params_leave_out_the_embedding():
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(50, 4)
    model.proj = torch.nn.Linear(4, 4, bias=False)
    model.proj.weight.requires_grad_(False)
    model.head = torch.nn.Linear(4, 2)
    assert tp.model_params(model) == (16 + 8 + 2, 8 + 2)


def test_peak_is_a_probe_on_cpu_and_the_datasheet_on_a_known_gpu(monkeypatch):
    cpu = tp.peak_flops("cpu", "float32")
    assert cpu > 1e8 and tp.peak_flops("cpu", "float32") == cpu  # measured once per thread count
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert tp._peak.__wrapped__("cuda", "bfloat16", 0) == pytest.approx(989e12)
