"""The sharded learner (FSDP2 over gloo on CPU): N = 2 ranks make the one-process update.

Each invariance test trains one learner in this process (no process group: the plain path) and a group of two
in spawned processes (gloo, `torch.distributed.fsdp.fully_shard`), on the same experience and checkpoints, then
compares the full (LoRA-merged) policy and critic weights after four optimizer steps."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rayrlhf.roles.learner import PPOLearner
from rayrlhf.core.sharding import full_weights, rank_share
from rayrlhf.core.weight_sync import checksum, unpack

# 8 sequences; minibatches of 4 (2 per rank), micro batches of 1, two epochs: four optimizer steps.
GROUP_STEP = ["ppo.prompts_per_step=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4", "ppo.micro_batch_size=1",
              "ppo.ppo_epochs=2", "reward.missing_eos_score=null"]  # raw scores: RLOO advantages not all 0
LORA = ["model.lora.r=4", "model.lora.alpha=8"]


def test_rank_share_by_hand():
    lengths = [5, 9, 1, 7, 3, 8]
    # longest first: 9(1) 8(5) 7(3) 5(0) 3(4) 1(2); snake over 2 ranks: 0 1 1 0 0 1
    assert rank_share(lengths, 0, 2) == [0, 1, 4]  # 9 + 5 + 3 = 17 tokens
    assert rank_share(lengths, 1, 2) == [2, 3, 5]  # 8 + 7 + 1 = 16 tokens
    assert rank_share(lengths, 0, 1) == list(range(6))
    with pytest.raises(ValueError, match="cannot be split evenly over 4"):
        rank_share(lengths, 0, 4)


def test_full_weights_of_a_lora_model_are_its_merged_weights(make_tiny_cfg, tiny_checkpoints):
    """Unsharded, `full_weights` streams exactly what peft's merge_and_unload gives (names and values)."""
    from rayrlhf.core.modeling import unwrap

    learner = PPOLearner.from_config(make_tiny_cfg(*GROUP_STEP, *LORA), str(tiny_checkpoints.sft),
                                     str(tiny_checkpoints.rm), device="cpu")
    with torch.no_grad():  # non-zero B, so the merge is visible
        for name, p in learner.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        for name, p in learner.critic.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # the critic's head is trained in full
                p.normal_(0, 0.1)
    for model in (learner.policy, learner.critic):
        streamed = dict(full_weights(model))
        merged = dict(unwrap(model).named_parameters())
        assert list(streamed) == list(merged)
        assert max((streamed[k] - merged[k]).abs().max().item() for k in merged) <= 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_rank(rank: int, world: int, port: int, overrides: list[str], sft: str, rm: str, exp_path: str,
                out_path: str) -> None:
    """One rank of the learner group (a spawned process)."""
    import torch.distributed as dist

    from conftest import TINY_OVERRIDES
    from rayrlhf.core.config import load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        learner = PPOLearner.from_config(load_config(None, [*TINY_OVERRIDES, *overrides]), sft, rm, device="cpu")
        assert learner.rank.world == world
        metrics = learner.train_step(torch.load(exp_path, weights_only=False))
        stored: list[torch.Tensor] = []
        packet = learner.make_packet(store=lambda b: stored.append(b) or len(stored) - 1)  # collective
        assert (packet is None) == (rank != 0)
        if packet is not None:  # streamed bucket by bucket, each stored away as it filled
            assert packet.buckets == tuple(range(len(stored))) and packet.version == learner.version
            assert checksum(unpack(packet.layouts, stored)) == packet.checksum
        policy = learner.policy_weights()  # collective
        critic = {n: t.cpu() for n, t in full_weights(learner.critic)} if learner.critic is not None else {}
        if rank == 0:
            assert packet.checksum == checksum(policy.items())
            torch.save({"policy": policy, "critic": critic, "metrics": metrics}, out_path)
    finally:
        dist.destroy_process_group()


def _resume_rank(rank: int, world: int, port: int, overrides: list[str], sft: str, rm: str, exp_path: str,
                 out_path: str) -> None:
    """One rank: a step, a sharded checkpoint, then a second step by this learner and by a fresh one loaded
    from the checkpoint (as `--resume` does); rank 0 saves what the test compares."""
    from dataclasses import replace

    import torch.distributed as dist

    from conftest import TINY_OVERRIDES
    from rayrlhf.core.config import load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
        exp = torch.load(exp_path, weights_only=False)
        ckpt = Path(out_path).parent / "ckpt"
        first = PPOLearner.from_config(cfg, sft, rm, device="cpu")
        first.train_step(exp)
        after_one = first.policy_weights()
        first.save(ckpt)
        second = PPOLearner.from_config(cfg, sft, rm, device="cpu")
        assert second.load(ckpt) == 1
        exp2 = replace(exp, batch_id=1, policy_version=1)
        first.train_step(exp2)
        second.train_step(exp2)
        kept, resumed = first.policy_weights(), second.policy_weights()
        if rank == 0:
            torch.save({"after_one": after_one, "kept": kept, "resumed": resumed}, out_path)
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
# GAE and RLOO, full weights and LoRA, each covered once (the other pairings passed too: 7.5e-9 at most), and
# packed micro batches
@pytest.mark.parametrize(("estimator", "lora"), [("gae", True), ("rloo", False), ("gae", "packed")],
                         ids=["gae-lora", "rloo-full", "gae-packed"])
def test_two_ranks_make_the_one_process_update(make_tiny_cfg, tiny_checkpoints, make_experience, tmp_path,
                                               estimator, lora):
    """`packed`: full weights, micro batches packed under a token budget (each rank as many as the busiest)."""
    import torch.multiprocessing as mp

    variant = {False: [], True: LORA, "packed": ["ppo.max_tokens_per_micro_batch=200"]}[lora]
    overrides = [*GROUP_STEP, f"ppo.advantage_estimator={estimator}", *variant]
    cfg = make_tiny_cfg(*overrides)
    exp = make_experience(cfg)
    # behaviour log-probs off the learner's (an engine mismatch): importance weights that differ by row and token,
    # so the group's off-policy sums must be reduced over ranks to match
    noise = torch.rand(exp.logprobs.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    exp = replace(exp, logprobs=exp.logprobs + noise * exp.response_mask)
    exp_path = tmp_path / "exp.pt"
    torch.save(exp, exp_path)
    sft, rm = str(tiny_checkpoints.sft), str(tiny_checkpoints.rm)

    one = PPOLearner.from_config(cfg, sft, rm, device="cpu")
    before = {n: t.detach().clone() for n, t in one.policy_weights().items()}
    one_metrics = one.train_step(torch.load(exp_path, weights_only=False))
    one_policy = {n: t.detach().clone() for n, t in one.policy_weights().items()}
    one_critic = dict(full_weights(one.critic)) if one.critic is not None else {}

    out = tmp_path / "group.pt"
    os.environ.pop("RAY_ADDRESS", None)
    mp.spawn(_group_rank, args=(2, _free_port(), overrides, sft, rm, str(exp_path), str(out)), nprocs=2)
    group = torch.load(out, weights_only=False)

    moved = _max_diff(one_policy, before)
    assert moved > 0.5 * cfg.ppo.lr  # a real update
    policy_diff = _max_diff(group["policy"], one_policy)
    critic_diff = _max_diff(group["critic"], one_critic) if one_critic else 0.0
    print(f"\n{estimator} {lora}: N=2 vs N=1 max |diff| policy {policy_diff:.2e}, "
          f"critic {critic_diff:.2e} (update moved weights by up to {moved:.2e})")
    assert policy_diff <= 1e-5 and critic_diff <= 1e-5
    # Adam hides a constant factor in a gradient (a sum-vs-mean reduction bug): the norms and losses must agree too
    keys = ["ppo/policy_loss", "ppo/entropy", "ppo/approx_kl", "ppo/policy_grad_norm", "ppo/kl",
            "ppo/mismatch_abs_diff_mean", "ppo/mismatch_abs_diff_max", "ppo/mismatch_kl_k1", "ppo/is_ess",
            "ppo/is_weight_mean", "ppo/is_bounded_fraction"]
    if one.critic is not None:
        keys += ["ppo/critic_grad_norm", "ppo/value_loss", "ppo/value_clip_fraction", "ppo/value_mean"]
    for key in keys:
        assert group["metrics"][key] == pytest.approx(one_metrics[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_exactly_and_exports_full_weights(make_tiny_cfg, tiny_checkpoints,
                                                                       make_experience, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    overrides = [*GROUP_STEP, *LORA]
    exp_path = tmp_path / "exp.pt"
    torch.save(make_experience(make_tiny_cfg(*overrides)), exp_path)
    out = tmp_path / "resume.pt"
    mp.spawn(_resume_rank, args=(2, _free_port(), overrides, str(tiny_checkpoints.sft), str(tiny_checkpoints.rm),
                                 str(exp_path), str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    assert _max_diff(got["resumed"], got["kept"]) <= 1e-6  # optimizer, scheduler and RNG states restored
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "checkpoint")  # plain, LoRA merged
    assert _max_diff(dict(exported.named_parameters()), got["after_one"]) == 0.0
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "critic")
    assert critic.config.num_labels == 1


def _relative_change(after: dict, before: dict, reference: dict) -> float:
    """|| after - reference || / || reference - before || over all parameters: how far an update lands from the
    reference update, in units of the reference update's own length."""
    num = sum(((after[k].float() - reference[k].float()) ** 2).sum() for k in reference)
    den = sum(((reference[k].float() - before[k].float()) ** 2).sum() for k in reference)
    return float((num / den).sqrt())


@pytest.mark.slow
def test_bf16_mixed_precision_update_is_close_to_the_fp32_update(make_tiny_cfg, tiny_checkpoints, make_experience,
                                                                tmp_path, world=2):
    """FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 reduction, fp32 master weights and AdamW state) against
    the fp32 one-process update on the same batch: the same step within bf16's precision, not bit-equal."""
    import torch.multiprocessing as mp

    cfg = make_tiny_cfg(*GROUP_STEP)
    exp_path = tmp_path / "exp.pt"
    torch.save(make_experience(cfg), exp_path)
    sft, rm = str(tiny_checkpoints.sft), str(tiny_checkpoints.rm)
    fp32 = PPOLearner.from_config(cfg, sft, rm, device="cpu")
    before = {n: t.detach().clone() for n, t in fp32.policy_weights().items()}
    fp32_metrics = fp32.train_step(torch.load(exp_path, weights_only=False))
    fp32_policy = {n: t.detach().clone() for n, t in fp32.policy_weights().items()}

    out = tmp_path / "bf16.pt"
    os.environ.pop("RAY_ADDRESS", None)
    mp.spawn(_group_rank, args=(world, _free_port(), [*GROUP_STEP, "model.mixed_precision=bf16"], sft, rm,
                                str(exp_path), str(out)), nprocs=world)
    bf16 = torch.load(out, weights_only=False)
    assert all(t.dtype == torch.float32 for t in bf16["policy"].values())  # master weights stay fp32
    rel = _relative_change(bf16["policy"], before, fp32_policy)
    loss_diff = abs(bf16["metrics"]["ppo/policy_loss"] - fp32_metrics["ppo/policy_loss"])
    print(f"\nbf16 mixed precision, N={world}: policy update off the fp32 one by {rel:.3f} of its length; "
          f"policy loss {bf16['metrics']['ppo/policy_loss']:.5f} vs {fp32_metrics['ppo/policy_loss']:.5f}")
    assert 1e-4 < rel < 0.1  # measured 0.018 (also with N=1); above 1e-4: bf16 really was on
    assert bf16["metrics"]["ppo/kl"] == pytest.approx(fp32_metrics["ppo/kl"], rel=1e-6)  # from the batch, not computed
    assert loss_diff < 0.02


def test_gathered_lora_merge_is_peft_merge_on_conv1d_and_refuses_dora():
    """The merge a sharded learner syncs and saves (`full_weights`) equals peft's own, on GPT-2's Conv1D layers
    (fan_in_fan_out: weights stored transposed); DoRA and a LoRA bias, which merge otherwise, are refused."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def lora_gpt2(**variant):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                fan_in_fan_out=True, **variant))
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # B starts at 0: give the adapters a delta to merge
                torch.nn.init.normal_(p, std=0.1)
        return peft

    peft = lora_gpt2()
    got = dict(full_weights(peft))
    want = dict(copy.deepcopy(peft).merge_and_unload().named_parameters())
    assert sorted(got) == sorted(want)
    assert _max_diff({k: got[k] for k in want}, want) < 1e-6
    for variant in ({"use_dora": True}, {"lora_bias": True}):
        with pytest.raises(ValueError, match=next(iter(variant))):
            dict(full_weights(lora_gpt2(**variant)))
