"""Weights that train keep fp32 master copies on every path, and every config trains them.

Adam's first step moves an element by about lr: at the GPU configs' PPO rate (3e-6) that is far below half a
bf16 ulp of a weight of 0.02 (or of a norm weight of 1), so a trainer stepping bf16 weights leaves most of them
where they were. A step under each shipped config's dtype settings must change every element its gradient
reaches; full-weight training in bf16/fp16 without a master copy is refused when the config loads."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from rayrlhf.core.config import ConfigError, load_config, packaged_config_path

pytestmark = pytest.mark.slow  # the tiny checkpoints (trained once per session)

CONFIGS = sorted(p.name for p in packaged_config_path().parent.glob("*.yaml"))
GPU_CONFIGS = ["opt-350m.yaml", "pythia-1b.yaml"]
LR = 3e-6  # the GPU configs' PPO rate: the hardest case for bf16 weights


def _model_settings(name: str) -> list[str]:
    """The dtype settings of a shipped config as `--set` items for the tiny model."""
    model = yaml.safe_load(packaged_config_path(name).read_text())["model"]
    keys = ("dtype", "mixed_precision", "inference_dtype")
    items = [f"model.{k}={model[k]}" for k in keys if k in model]
    if model.get("lora"):
        items.append("model.lora.r=4")
    return items


@pytest.fixture
def group_of_one():
    """mixed_precision makes a trainer a process group of one: closed after each test, so no other test in this
    worker process sees a group."""
    import torch.distributed as dist

    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_train_fp32_master_weights(name):
    cfg = load_config(packaged_config_path(name))
    assert cfg.model.dtype == "float32" or cfg.model.lora is not None, name
    if name in GPU_CONFIGS:  # bf16 compute and bf16 inference, fp32 weights and optimizer state
        assert (cfg.model.mixed_precision, cfg.model.frozen_dtype) == ("bf16", "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_full_weight_training_in_half_precision_is_refused(dtype):
    with pytest.raises(ConfigError, match=rf"model.dtype {dtype} with model.lora null .*model.mixed_precision bf16"):
        load_config(packaged_config_path("pythia-1b.yaml"), [f"model.dtype={dtype}", "model.mixed_precision='no'"])
    # LoRA on a frozen half-precision base is allowed: the adapters and a scalar head train in fp32
    assert load_config(None, [f"model.dtype={dtype}", "model.lora.r=4"]).model.lora.r == 4


def test_inference_dtype_defaults_to_the_weights_dtype():
    assert load_config(None).model.frozen_dtype == "float32"
    assert load_config(None, ["model.inference_dtype=bfloat16"]).model.frozen_dtype == "bfloat16"


def _snapshot(model) -> dict[str, torch.Tensor]:
    from rayrlhf.core.sharding import full_weights

    return {k: v.detach().float().clone() for k, v in full_weights(model)}


def _assert_every_reached_element_moved(before: dict, after: dict, what: str) -> None:
    """Every element of every tensor changed (up to the few whose bf16-computed gradient is exactly 0: >= 99.9 %;
    stepping bf16 weights moves 3.9 % at this lr), except embedding rows of tokens the batch did not contain
    (their gradient is 0, so Adam leaves them)."""
    assert before.keys() == after.keys()
    for k in before:
        moved = before[k] != after[k]
        if "embed" in k:
            moved = moved.any(-1)  # rows: the tokens in the batch
            assert moved.any(), f"{what}: {k} did not move"
            continue
        share = moved.float().mean().item()
        assert share >= 0.999, f"{what}: {k}: {share:.1%} of the elements changed"


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_learner_step_moves_every_weight(name, make_tiny_cfg, tiny_checkpoints, make_experience, group_of_one):
    from rayrlhf.roles.learner import PPOLearner

    overrides = ["ppo.prompts_per_step=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
                 "ppo.micro_batch_size=8", "ppo.ppo_epochs=1", f"ppo.lr={LR}", f"ppo.critic_lr={LR}",
                 "ppo.lr_schedule=constant", *_model_settings(name)]
    cfg = make_tiny_cfg(*overrides)
    exp = make_experience(make_tiny_cfg(*overrides[:5]))
    learner = PPOLearner.from_config(cfg, str(tiny_checkpoints.sft), str(tiny_checkpoints.rm), device="cpu")
    policy, critic = _snapshot(learner.policy), _snapshot(learner.critic)
    learner.train_step(copy.deepcopy(exp))
    _assert_every_reached_element_moved(policy, _snapshot(learner.policy), f"{name} policy")
    _assert_every_reached_element_moved(critic, _snapshot(learner.critic), f"{name} critic")
    # what the rollout receives is in the inference dtype
    assert {t.dtype for t in learner.policy_weights().values()} == {torch.bfloat16}


def _trainer_step(cfg, model, loss_fn) -> None:
    """One optimizer step as the SFT and RM trainers take it (`core.training`)."""
    from rayrlhf.core.sharding import TrainGroup, shard_model
    from rayrlhf.core.training import adamw_cosine, optimizer_step

    group = TrainGroup.start(cfg.model.mixed_precision, 60)
    if group.fsdp:
        model = shard_model(model, cfg.model.mixed_precision)
    opt, sched = adamw_cosine(model, LR, 0.0, 0.0, 10)
    before = _snapshot(model)
    loss_fn(model).backward()
    optimizer_step(model, opt, sched, 1.0)
    return before, _snapshot(model)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_sft_and_rm_steps_move_every_weight(name, make_tiny_cfg, tiny_checkpoints, group_of_one):
    from rayrlhf.roles.rm import pairwise_loss
    from rayrlhf.roles.sft import sft_batch, sft_loss
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.modeling import load_causal_lm, load_scalar_model, load_tokenizer, trainable
    from rayrlhf.core.forward import sequence_scores
    from rayrlhf.core.padding import pad_right
    from rayrlhf.core.text import encode_responses, encode_summaries

    cfg = make_tiny_cfg(*_model_settings(name))
    tok = load_tokenizer(str(tiny_checkpoints.sft))
    data = load_tldr(cfg.data)
    d = cfg.data

    sft = trainable(load_causal_lm(str(tiny_checkpoints.sft), tok, cfg.model.dtype), cfg.model, "CAUSAL_LM")
    items = encode_summaries(tok, data.sft_train[:8], d.max_prompt_tokens, d.max_summary_tokens)
    batch = sft_batch(items, tok.pad_token_id)
    before, after = _trainer_step(cfg, sft, lambda m: sft_loss(m, batch)[0])
    _assert_every_reached_element_moved(before, after, f"{name} SFT")

    rm = trainable(load_scalar_model(str(tiny_checkpoints.sft), tok, cfg.model.dtype, init_head=True), cfg.model,
                   "SEQ_CLS")
    pairs = data.pairs_train[:8]
    queries = [p.query for p in pairs]
    chosen = encode_responses(tok, queries, [p.chosen for p in pairs], d.max_prompt_tokens, d.max_summary_tokens)
    rejected = encode_responses(tok, queries, [p.rejected for p in pairs], d.max_prompt_tokens, d.max_summary_tokens)
    ids, mask = pad_right(chosen + rejected, tok.pad_token_id)  # both sides in one forward, as a group trains

    def rm_loss(model):
        scores = sequence_scores(model, ids, mask)
        return pairwise_loss(scores[: len(chosen)], scores[len(chosen):])

    before, after = _trainer_step(cfg, rm, rm_loss)
    _assert_every_reached_element_moved(before, after, f"{name} RM")


def test_lora_on_a_bf16_base_trains_fp32_adapters_and_head(make_tiny_cfg, tiny_checkpoints):
    """LoRA with a frozen bf16 base: what trains (adapters, the scalar head) is fp32 and moves at a small lr."""
    from rayrlhf.core.modeling import load_scalar_model, load_tokenizer, trainable

    cfg = make_tiny_cfg("model.dtype=bfloat16", "model.lora.r=4")
    tok = load_tokenizer(str(tiny_checkpoints.sft))
    rm = trainable(load_scalar_model(str(tiny_checkpoints.sft), tok, cfg.model.dtype, init_head=True), cfg.model,
                   "SEQ_CLS")
    trained = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}, \
        {n: p.dtype for n, p in trained.items() if p.dtype != torch.float32}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    opt = torch.optim.AdamW(trained.values(), lr=LR)
    before = {n: p.detach().clone() for n, p in trained.items()}
    for _ in range(2):  # lora_B starts at 0: A's gradient is 0 until B has moved once
        out = rm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        out.float().sum().backward()
        opt.step()
        opt.zero_grad()
    for n, p in trained.items():
        assert (p != before[n]).float().mean().item() == 1.0, n
