"""Adapter-only weight sync of a LoRA policy (`rollout.lora_sync`), on the plain classes (no Ray).

The learner sends its LoRA matrices only; an HF rollout worker loaded the base once and applies them in the same
unmerged forward as the learner, so what it samples from is what the learner computes at that version. Every
adapter load is verified by reading the checksum back from the matrices the worker computes with; a packet that
misses a tensor, or whose bytes changed on the way, fails the load naming the worker and the version.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from rayrlhf.core.config import ConfigError
from rayrlhf.core.experience import RolloutRequest
from rayrlhf.core.forward import response_logprobs
from rayrlhf.core.sharding import adapter_weights
from rayrlhf.core.weight_sync import WeightSyncError, checksum, stream_packet
from rayrlhf.roles.learner import PPOLearner
from rayrlhf.roles.rollout import RolloutGenerator

LORA = ["model.lora={r: 4, alpha: 8}"]


def _learner_logprobs(learner: PPOLearner, batch) -> torch.Tensor:
    """The learner's log-probs of a rollout batch's responses, at its current version."""
    learner.policy.eval()
    with torch.no_grad():
        lp, _ = response_logprobs(learner.policy, batch.prompts, batch.prompt_mask, batch.responses,
                                  batch.response_mask, learner.temperature)
    return lp * batch.response_mask


@pytest.fixture(scope="module")
def trained(make_tiny_cfg, tiny_checkpoints, make_experience):
    """A LoRA learner two updates on (its adapters away from their zero start), and its config."""
    cfg = make_tiny_cfg(*LORA)
    assert cfg.sync_adapters
    learner = PPOLearner.from_config(cfg, str(tiny_checkpoints.sft), str(tiny_checkpoints.rm))
    for version in range(2):
        learner.train_step(make_experience(cfg, version))
    assert learner.version == 2
    return cfg, learner


def _request(gen: RolloutGenerator, cfg) -> RolloutRequest:
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.text import encode_queries

    queries = encode_queries(gen.backend.tokenizer, [e.query for e in load_tldr(cfg.data).sft_train[:4]],
                             cfg.data.max_prompt_tokens)
    return RolloutRequest(batch_id=2, shard=0, prompt_indices=[0, 1, 2, 3], prompts=queries, seed=5, version=2)


def test_adapter_sync_samples_what_the_learner_computes(trained, tiny_checkpoints):
    cfg, learner = trained
    adapters, merged = learner.make_packet(adapters=True), learner.make_packet()
    nbytes = {name: sum(lay.numel * lay.dtype.itemsize for lay in p.layouts)
              for name, p in (("adapters", adapters), ("merged", merged))}
    print(f"bytes per sync: adapters {nbytes['adapters']}, merged {nbytes['merged']}")
    assert adapters.adapters and not merged.adapters and nbytes["adapters"] < nbytes["merged"]

    sft = str(tiny_checkpoints.sft)
    by_adapters = RolloutGenerator(sft, cfg.rollout, 0, lora=cfg.model.lora)
    by_merged = RolloutGenerator(sft, cfg.rollout, 1)
    by_adapters.load_weights(adapters)  # verified: checksum read back from the worker's LoRA matrices
    by_merged.load_weights(merged, verify=True)
    assert by_adapters.weights_checksum().checksum == adapters.checksum

    diffs = {}
    for name, gen in (("adapters", by_adapters), ("merged", by_merged)):
        batch = gen.generate(_request(gen, cfg))
        assert batch.policy_version == 2
        mine = _learner_logprobs(learner, batch)
        diffs[name] = (batch.logprobs * batch.response_mask - mine).abs().max().item()
    print(f"max |behaviour - learner| log-prob at v2: {diffs}")
    # the adapter worker runs the learner's own unmerged forward; the merged one sums B A into W first
    assert diffs["adapters"] <= 1e-5 and diffs["merged"] <= 1e-4, diffs


def test_an_adapter_lost_or_changed_on_the_way_fails_the_sync_naming_worker_and_version(trained, tiny_checkpoints):
    cfg, learner = trained
    gen = RolloutGenerator(str(tiny_checkpoints.sft), cfg.rollout, 3, lora=cfg.model.lora)
    named = dict(adapter_weights(learner.policy))
    dropped = sorted(named)[0]
    short = dataclasses.replace(stream_packet([(k, v) for k, v in named.items() if k != dropped], 2, 2**20),
                                adapters=True)
    with pytest.raises(WeightSyncError, match=r"^rollout worker 3, weights v2: .*left 1 parameters unset"):
        gen.load_weights(short)

    changed = dict(named)
    changed[dropped] = named[dropped] + 1e-3
    # the checksum of the weights as sent, the tensors as received
    sent = stream_packet(named.items(), 2, 2**20)
    received = stream_packet(changed.items(), 2, 2**20)
    corrupt = dataclasses.replace(received, checksum=sent.checksum, adapters=True)
    held = checksum(gen.backend.named_weights().items())
    with pytest.raises(WeightSyncError, match=r"^rollout worker 3, weights v2: the adapters arrived with checksum \w+, "
                                              r"the learner sent"):
        gen.load_weights(corrupt)
    assert gen.version == 0 and checksum(gen.backend.named_weights().items()) == held  # nothing of it loaded

    with pytest.raises(WeightSyncError, match=r"the learner sent full weights, the worker holds its base with LoRA"):
        gen.load_weights(learner.make_packet())


def test_lora_sync_adapters_is_refused_where_it_cannot_go(make_tiny_cfg):
    from rayrlhf.core.config import load_config

    assert not make_tiny_cfg(*LORA, "rollout.lora_sync=merged").sync_adapters
    assert not make_tiny_cfg().sync_adapters  # no LoRA: full weights
    # vLLM workers merge the adapters into their base without GPUs (vLLM's CPU LoRA kernels are slow), take them
    # as LoRA requests on GPUs
    cpu = make_tiny_cfg(*LORA, "rollout.backend=vllm")
    assert cpu.sync_adapters and cpu.rollout.merges_adapters
    gpu = make_tiny_cfg(*LORA, "rollout.backend=vllm", "rollout.num_gpus=1")
    assert gpu.sync_adapters and not gpu.rollout.merges_adapters
    # as requests, not in flight (a request keeps its adapter) nor tensor-parallel; merged by the worker, both can
    inflight = [*LORA, "rollout.backend=vllm", "rollout.inflight=true"]
    assert make_tiny_cfg(*inflight).sync_adapters
    assert not make_tiny_cfg(*inflight, "rollout.vllm_adapters=lora").sync_adapters
    with pytest.raises(ConfigError, match=r"rollout.inflight to vLLM workers as LoRA requests \(rollout.vllm_adapters "
                                          r"lora; merge can\): a request keeps the LoRA adapter it started with"):
        load_config(None, [*inflight, "rollout.vllm_adapters=lora", "rollout.lora_sync=adapters"])
    with pytest.raises(ConfigError, match="rollout.lora_sync adapters: needs model.lora"):
        load_config(None, ["rollout.lora_sync=adapters"])
    with pytest.raises(ConfigError, match="rollout.lora_sync adapters: needs ppo.weight_sync object_store"):
        load_config(None, [*LORA, "rollout.lora_sync=adapters", "ppo.weight_sync=collective"])
    head = ["model.lora={r: 4, target_modules: [q_proj, lm_head]}", "rollout.backend=vllm"]
    assert not load_config(None, head).sync_adapters  # auto: merged
    with pytest.raises(ConfigError, match=r"target_modules \['lm_head'\]: adapters of the embeddings or the head"):
        load_config(None, [*head, "rollout.lora_sync=adapters"])


@pytest.mark.slow
def test_a_lora_ppo_run_on_ray_syncs_adapters_only_from_a_learner_group(ray_local, make_tiny_cfg, tiny_checkpoints,
                                                                        tmp_path):
    """Two learner ranks (FSDP2) gather only the LoRA matrices; two rollout workers load them each version and
    verify them (a checksum read back from their LoRA matrices). (`-k ray` outside CI also runs it merged.)"""
    from rayrlhf.pipeline.driver import PPODriver

    sizes = [*LORA, "ppo.steps=3", "ppo.learner_workers=2", "rollout.num_workers=2", "rollout.num_cpus=0.5",
             "reference.num_cpus=0.5", "reward.num_cpus=0.5"]
    summaries = {}
    for mode in ("adapters",) if os.environ.get("CI") else ("adapters", "merged"):
        cfg = make_tiny_cfg(*sizes, f"rollout.lora_sync={mode}")
        assert cfg.sync_adapters == (mode == "adapters")
        driver = PPODriver(cfg, tmp_path / mode / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm)
        try:
            summaries[mode] = driver.run()
        finally:
            driver.close()
        assert summaries[mode]["ppo/steps"] == 3 and summaries[mode]["ledger/consumed_batches"] == 3
    print({m: round(s["ppo/final_score_mean"], 6) for m, s in summaries.items()})
