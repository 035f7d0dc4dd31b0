"""The GPU path, rehearsed: every role's plain class on one device, one table, a non-zero exit on a failed check.

On one CUDA GPU (or the CPU), without Ray or vLLM, for a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads,
3 KV heads, vocabulary 49152, tied embeddings) and a Pythia-1B-shaped GPT-NeoX (hidden 2048, 16 layers, 8 heads,
MLP 8192, vocabulary 50304), random-initialised from their configs (no download, no hub) and saved with a
byte-level BPE tokenizer of the same vocabulary built offline into a temporary folder, this runs, in order:

    sft          two `SFTTrainer._train_step`s on one batch (`sft_batch`, `sft_loss`); the second is timed
    rm           two `RMTrainer._train_step`s on one batch of pairs from the policy checkpoint with a fresh head
                 (`pairwise_loss`; `pairs.pair_scores` where `rm.share_prefix` applies: not under FSDP, so in
                 fp32 only); the second is timed
    rollout      `RolloutGenerator`, hf backend: 2 samples per prompt and their behaviour log-probs
    reference    `ReferenceLogprobs` on that rollout
    reward       `RewardScorer` on that rollout (EOS trick off: a random model rarely ends a response, so the trick
                 would give every response the same score)
    learner      `PPOLearner.train_step` (GAE, a critic from the reward model) on the joined `Experience`, the
                 ratio clipped against the behaviour log-probs: no off-policy correction (ppo.proximal_policy
                 false, ppo.behaviour_is none)
    learner+IS   the same with the correction: the ratio against the proximal policy, token importance weights
                 pi_prox / pi_behav truncated at 2 (ppo.proximal_policy true, ppo.behaviour_is token)

The batch: 4 (toy) or 16 (real) prompts of random tokens, 2 samples each; the learner cuts it into two minibatches
(two optimizer steps, so the proximal forward runs too) of micro batches. On a GPU each inference role is timed on
its second call and each learner on a second update of the same batch (one version stale, `ppo.max_staleness` 1):
a first call selects kernels and grows the allocator. On a CPU one call (one update) each.

Precision (`--precision`): bf16 (default) is the GPU configs' (configs/pythia-1b.yaml): fp32 master weights and
AdamW state with bf16 compute in the trainers and the learner (`model.mixed_precision: bf16`: FSDP2 in a process
group of one, NCCL on a GPU, gloo on a CPU, on a free local port: MASTER_ADDR and the like are not read), bf16
rollout, reference and reward (`model.inference_dtype`). fp32: every model in fp32, no FSDP.

Columns: s, the timed call's seconds; tokens/s, the real tokens it ran through its model per second (prompt and
response; SFT and RM the whole examples; the learner's own `perf/learner_tokens_per_s`), for the rollout the tokens
it generated; MFU, the role's own (`core.work.WorkMeter`) against the device's peak in its compute dtype, on a GPU
the datasheet's dense figure (`core.throughput.peak_flops`), on a CPU a probe; loss, the second step's (SFT, RM) or
the first update's policy loss. |dlogp| mean and max and k3 (`ppo_math.mismatch`) compare the rollout's behaviour
log-probs with the reference's (the same weights, in the same inference dtype) and with the learner's (fp32 master
weights, bf16 compute) before its update: for `learner` a forward of its policy, for `learner+IS` its own
`ppo/mismatch_*`. The note: the first update's share of weights moved, clip fraction, the learner's own check of
its first minibatch (`ppo/behaviour_logprob_max_diff`) and with the correction the importance weights (`ppo/is_*`).

Checks (a failed one is named `<model>/<role>: <check>` under the table):
  ran            the role raised nothing (the traceback goes to stderr; the run goes on, the roles that read its
                 output fail too)
  on device      the trainer's model sits on the device asked for
  generated      the rollout sampled some response tokens
  finite         every loss, score, learner metric and log-prob is finite, log-probs <= 0
  loss falls     the second step's loss on the same batch is below the first's (SFT, RM)
  weights moved  one update changed >= 90 % of the elements outside the embeddings, of the policy and of the
                 critic alike (fp32 master weights move at the GPU configs' lr 3e-6; bf16 weights stepped
                 directly, about 4 %: tests/test_precision.py)
  mismatch       max |dlogp| <= 1e-3 in fp32 (the same weights and math: float error only); in bf16 max <= 1.0
                 and mean <= 0.05 (rounding; wrong weights or a wrong cast show as nats). `--max-abs-diff` sets
                 the bound on the max
  IS weights     with the correction, the importance weights' effective sample size >= 0.9 (the update is on
                 its own rollout)
  MFU <= 1       on a GPU, against the datasheet peak: more means a wrong FLOP count (not on a CPU, whose probed
                 peak a busy machine can understate)

Run it on one GPU: the repository alone (it imports this tree as `rayrlhf`, installed or not), torch, transformers,
peft and tokenizers; no Ray, no vLLM, no network. `--size real` is sized for at most 8 minutes on one H100.

    python bench/gpu_check.py                             # --device auto: the GPU, --size real, --precision bf16
    python bench/gpu_check.py --precision fp32            # the same in fp32: the tight mismatch bound
    python bench/gpu_check.py --device cpu --size toy     # the same code path on a CPU (the default size there)
    python bench/gpu_check.py --json gpu_check.json       # also the rows as data (bench/result_file.py)

Exit status: 0 when every check passed, 1 when one failed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import itertools
import math
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# Bounds of the mismatch check (module docstring): fp32 is float error only; bf16 rounds every matmul.
MAX_ABS_DIFF = {"fp32": 1e-3, "bf16": 1.0}
MAX_MEAN_DIFF_BF16 = 0.05
MIN_MOVED = 0.90  # share of the non-embedding elements one update changes
MIN_IS_ESS = 0.9


@dataclass(frozen=True)
class Arch:
    """A model shape: a Llama (SmolLM2) or a GPT-NeoX (Pythia)."""

    name: str
    family: Literal["llama", "gpt_neox"]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Shape:
    """The batches: `prompts` distinct prompts x 2 samples (PPO), as many SFT examples, `prompts` RM pairs."""

    prompts: int
    prompt_tokens: tuple[int, int]
    summary_tokens: tuple[int, int]
    new_tokens: int
    micro: int  # sequences per micro batch (pairs: half)


SIZES = {
    "real": ((Arch("smollm2-135m", "llama", 576, 30, 9, 3, 1536, 49152),
              Arch("pythia-1b", "gpt_neox", 2048, 16, 8, 8, 8192, 50304)),
             Shape(16, (96, 320), (16, 53), 53, 8)),
    "toy": ((Arch("smollm2-toy", "llama", 64, 2, 4, 2, 128, 512),
             Arch("pythia-toy", "gpt_neox", 64, 2, 2, 2, 256, 512)),
            Shape(4, (8, 24), (4, 12), 12, 4)),
}
ROLES = ("sft", "rm", "rollout", "reference", "reward", "learner", "learner+IS")


# --- rows and checks --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Row:
    """One (model, role) line of the table and the checks made on it."""

    model: str
    role: str
    seconds: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    loss: float | None = None
    diff_mean: float | None = None
    diff_max: float | None = None
    kl_k3: float | None = None
    note: str = ""
    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def attempt(row: Row, run: Callable[[Row], T]) -> T | None:
    """`run(row)`; an exception fails the row's `ran` check (its first line; the traceback to stderr) and the run
    goes on with the next role."""
    try:
        out = run(row)
    except Exception as e:  # noqa: BLE001 (every failure is reported, none stops the other roles)
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.check("ran", False, f"{type(e).__name__}: {first}"[:300])
        return None
    row.check("ran", True)
    return out


def finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def check_mismatch(row: Row, precision: str, max_abs_diff: float | None) -> None:
    """The row's behaviour-vs-other log-prob mismatch within the precision's bounds (module docstring)."""
    bound = MAX_ABS_DIFF[precision] if max_abs_diff is None else max_abs_diff
    ok = finite(row.diff_max) and row.diff_max <= bound
    detail = f"max |dlogp| {row.diff_max:.3g} > {bound:g}" if finite(row.diff_max) else f"max |dlogp| {row.diff_max}"
    if ok and precision == "bf16":
        ok = row.diff_mean <= MAX_MEAN_DIFF_BF16
        detail = f"mean |dlogp| {row.diff_mean:.3g} > {MAX_MEAN_DIFF_BF16:g}"
    row.check("mismatch", ok, "" if ok else detail)


def check_mfu(row: Row, device: str) -> None:
    if device == "cuda" and row.mfu is not None:
        row.check("MFU <= 1", 0 < row.mfu <= 1, f"MFU {row.mfu:.3g}")


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report(rows: list[Row], write: Callable[[str], None] = print) -> int:
    """The table, then each failed check on a line of its own -> the exit status (1 when a check failed)."""
    header = ("model", "role", "s", "tokens/s", "MFU", "loss", "|dlogp| mean", "|dlogp| max", "k3", "checks", "note")
    lines = [header]
    for r in rows:
        lines.append((r.model, r.role, _cell(r.seconds, ".2f"), _cell(r.tokens_per_s, ".0f"), _cell(r.mfu, ".3f"),
                      _cell(r.loss, ".4f"), _cell(r.diff_mean, ".2e"), _cell(r.diff_max, ".2e"), _cell(r.kl_k3, ".2e"),
                      "FAIL" if r.failed else "ok", r.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        write("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            write("  ".join("-" * w for w in widths))
    failed = [(r, c) for r in rows for c in r.failed]
    for r, c in failed:
        write(f"FAILED {r.model}/{r.role}: {c.name}{f' ({c.detail})' if c.detail else ''}")
    write(f"{len(failed)} of {sum(len(r.checks) for r in rows)} checks failed" if failed
          else f"all {sum(len(r.checks) for r in rows)} checks passed")
    return 1 if failed or not rows else 0


# --- models, tokenizer, batches ---------------------------------------------------------------------

def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly `vocab_size` tokens, built offline: pad and EOS (ids 0 and 1, as
    `train_tokenizer` makes them), the 256 byte symbols, then merges of byte pairs up to the size. A random model
    needs no real merges: the roles read token ids, EOS and a pad that is not EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rayrlhf.core.modeling import EOS_TOKEN, PAD_TOKEN

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < 2 + len(alphabet) or vocab_size > 2 + len(alphabet) ** 2:
        raise ValueError(f"vocab_size {vocab_size}: between {2 + len(alphabet)} and {2 + len(alphabet) ** 2}")
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1} | {c: 2 + i for i, c in enumerate(alphabet)}
    merges = list(itertools.islice(itertools.product(alphabet, repeat=2), vocab_size - len(vocab)))
    vocab |= {a + b: len(vocab) + i for i, (a, b) in enumerate(merges)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None, model_max_length=1 << 20)


def model_config(arch: Arch, tokenizer):
    """The transformers config of `arch` (the real models' other settings: SmolLM2's rope base 1e5, Pythia's
    rotary over a quarter of each head and parallel residual)."""
    from transformers import GPTNeoXConfig, LlamaConfig

    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    if arch.family == "llama":
        return LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                           num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                           num_key_value_heads=arch.kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                           tie_word_embeddings=True, **ids)
    return GPTNeoXConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                         num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
                         max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                         attention_dropout=0.0, hidden_dropout=0.0, **ids)


def save_random_checkpoints(arch: Arch, root: Path, device: str) -> tuple[Path, Path]:
    """A random policy (causal LM) and a random reward model (the same backbone shape with a scalar head, one
    label) saved as SFT and RM save theirs -> (policy folder, reward-model folder). Initialised on the device:
    a billion parameters take seconds there, a minute on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rayrlhf.core.modeling import save_checkpoint

    tokenizer = synthetic_tokenizer(arch.vocab)
    assert len(tokenizer) == arch.vocab, (len(tokenizer), arch.vocab)
    config = model_config(arch, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_checkpoint(policy, tokenizer, root / "policy")
    del policy
    scalar = copy.deepcopy(config)
    scalar.num_labels = 1
    with torch.device(device):
        rm = AutoModelForSequenceClassification.from_config(scalar, dtype=torch.float32)
    rm.config.reward_bias = 0.0
    save_checkpoint(rm, tokenizer, root / "rm")
    return root / "policy", root / "rm"


@dataclass(frozen=True)
class Batches:
    """Random token ids (never pad or EOS but where a summary ends): the PPO prompts (each twice, side by side),
    SFT examples and RM pairs that share their query."""

    prompts: list[list[int]]
    summaries: list[list[int]]
    rejected: list[list[int]]

    @classmethod
    def draw(cls, shape: Shape, vocab: int, eos: int, seed: int = 0) -> Batches:
        rng = random.Random(seed)

        def tokens(bounds: tuple[int, int]) -> list[int]:
            return [rng.randrange(2, vocab) for _ in range(rng.randint(*bounds))]

        prompts = [tokens(shape.prompt_tokens) for _ in range(shape.prompts)]
        return cls(prompts, [tokens(shape.summary_tokens) + [eos] for _ in prompts],
                   [tokens(shape.summary_tokens) + [eos] for _ in prompts])


def free_memory(device: str) -> None:
    """Give the last role's GPU memory back before the next loads its models (a CPU needs no collection)."""
    import torch

    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --- the roles --------------------------------------------------------------------------------------

def run_sft(row: Row, cfg, policy: Path, batches: Batches, device: str, out: Path) -> None:
    """Two SFT steps on one batch (query + summary per example, twice over the prompts)."""
    from rayrlhf.core.modeling import load_causal_lm, load_tokenizer
    from rayrlhf.core.sharding import TrainGroup
    from rayrlhf.core.text import EncodedSummary
    from rayrlhf.core.training import start_training
    from rayrlhf.roles.sft import SFTTrainer

    tok = load_tokenizer(str(policy))
    items = [EncodedSummary(q, s) for q, s in zip(batches.prompts * 2, batches.summaries + batches.rejected)]
    group = TrainGroup.start(cfg.model.mixed_precision, cfg.ray.startup_timeout_s)
    trainer = SFTTrainer(cfg, out)
    model = trainer._trainable(load_causal_lm(str(policy), tok, cfg.model.dtype), group)
    where = next(model.parameters()).device.type
    if not row.check("on device", where == device, f"the model is on {where}"):
        return
    training = start_training(model, cfg.sft, len(items), "examples", out, 1, False, {}, group)
    first = trainer._train_step(model, training, items, tok.pad_token_id, group)
    second = trainer._train_step(model, training, items, tok.pad_token_id, group)
    row.seconds = sum(len(e.query_ids) + len(e.summary_ids) for e in items) / second["sft/tokens_per_s"]
    row.tokens_per_s, row.mfu, row.loss = second["sft/tokens_per_s"], second["sft/mfu"], second["sft/loss"]
    row.note = f"loss {first['sft/loss']:.4f} -> {second['sft/loss']:.4f}"
    if row.check("finite", finite(*first.values(), *second.values()), f"{first} {second}"):
        row.check("loss falls", second["sft/loss"] < first["sft/loss"], row.note)


def run_rm(row: Row, cfg, policy: Path, batches: Batches, device: str, out: Path) -> None:
    """Two reward-model steps on one batch of pairs, from the policy checkpoint with a fresh head (as RM does)."""
    from rayrlhf.core.modeling import load_tokenizer
    from rayrlhf.core.sharding import TrainGroup
    from rayrlhf.core.training import start_training
    from rayrlhf.roles.rm import RMTrainer

    tok = load_tokenizer(str(policy))
    chosen = [q + s for q, s in zip(batches.prompts, batches.summaries)]
    rejected = [q + s for q, s in zip(batches.prompts, batches.rejected)]
    group = TrainGroup.start(cfg.model.mixed_precision, cfg.ray.startup_timeout_s)
    trainer = RMTrainer(cfg, out, policy)
    model = trainer._model(tok, group)
    where = next(model.parameters()).device.type
    if not row.check("on device", where == device, f"the model is on {where}"):
        return
    idx = list(range(len(chosen)))
    training = start_training(model, cfg.rm, len(idx), "pairs", out, 1, False, {}, group)
    first = trainer._train_step(model, training, (chosen, rejected), idx, tok.pad_token_id, group)
    second = trainer._train_step(model, training, (chosen, rejected), idx, tok.pad_token_id, group)
    tokens = sum(map(len, chosen)) + sum(map(len, rejected))
    row.seconds = tokens / second["rm/tokens_per_s"]
    row.tokens_per_s, row.mfu, row.loss = second["rm/tokens_per_s"], second["rm/mfu"], second["rm/loss"]
    row.note = (f"loss {first['rm/loss']:.4f} -> {second['rm/loss']:.4f}, "
                f"{'shared prefix' if trainer._shares(model) else 'whole sides'}")
    if row.check("finite", finite(*first.values(), *second.values()), f"{first} {second}"):
        row.check("loss falls", second["rm/loss"] < first["rm/loss"], row.note)


def run_rollout(row: Row, cfg, policy: Path, batches: Batches, warm: bool):
    """n = 2 samples of each prompt with their behaviour log-probs -> the timed call's `RolloutBatch`."""
    from rayrlhf.core.experience import RolloutRequest
    from rayrlhf.roles.rollout import RolloutGenerator

    gen = RolloutGenerator(str(policy), cfg.rollout, dtype=cfg.model.frozen_dtype,
                           share_prompts=cfg.rollout.share_prompts)
    n = cfg.ppo.samples_per_prompt
    indices = [i for i in range(len(batches.prompts)) for _ in range(n)]
    req = RolloutRequest(batch_id=0, shard=0, prompt_indices=indices, prompts=[batches.prompts[i] for i in indices],
                         seed=1)
    if warm:
        gen.generate(req)
    batch = gen.generate(req)
    generated = int(batch.response_mask.sum())
    row.seconds, row.mfu, row.tokens_per_s = batch.seconds, batch.mfu, generated / batch.seconds
    row.note = f"{batch.responses.shape[0]} sequences, {generated} tokens generated"
    lp = batch.logprobs[batch.response_mask.bool()]
    if row.check("generated", generated > 0, "no response token"):
        row.check("finite", bool(lp.isfinite().all() and (lp <= 0).all()),
                  f"behaviour log-probs in [{float(lp.min()):.3g}, {float(lp.max()):.3g}]")
    return batch


def run_reference(row: Row, cfg, policy: Path, rollout, device: str, warm: bool, max_abs_diff: float | None):
    """The reference's log-probs of the rollout (the policy's own weights: they match the behaviour's up to the
    inference dtype's rounding)."""
    from rayrlhf.core import ppo_math as pm
    from rayrlhf.roles.reference import ReferenceLogprobs

    ref = ReferenceLogprobs(str(policy), cfg.rollout.temperature, batch_size=cfg.reference.batch_size,
                            dtype=cfg.model.frozen_dtype, device=device, share_prompts=cfg.rollout.share_prompts)
    if warm:
        ref.logprobs(rollout)
    out = ref.logprobs(rollout)
    _mismatch(row, pm.mismatch(out.logprobs, rollout.logprobs, rollout.response_mask.float()))
    row.seconds, row.mfu = out.seconds, out.mfu
    row.tokens_per_s = int(rollout.prompt_mask.sum() + rollout.response_mask.sum()) / out.seconds
    mask = rollout.response_mask.bool()
    if row.check("finite", bool(out.logprobs[mask].isfinite().all() and (out.logprobs[mask] <= 0).all())):
        check_mismatch(row, "fp32" if cfg.model.frozen_dtype == "float32" else "bf16", max_abs_diff)
    return out


def run_reward(row: Row, cfg, rm: Path, rollout, device: str, warm: bool):
    from rayrlhf.roles.reward import RewardScorer

    scorer = RewardScorer(str(rm), missing_eos_score=None, batch_size=cfg.reward.batch_size,
                          dtype=cfg.model.frozen_dtype, device=device, share_prompts=cfg.rollout.share_prompts)
    if warm:
        scorer.score_rollout(rollout)
    out = scorer.score_rollout(rollout)
    row.seconds, row.mfu = out.seconds, out.mfu
    row.tokens_per_s = int(rollout.prompt_mask.sum() + rollout.response_mask.sum()) / out.seconds
    row.note = f"scores {float(out.scores.mean()):+.3f} +- {float(out.scores.std()):.3f}"
    row.check("finite", bool(out.scores.isfinite().all()), row.note)
    return out


def _mismatch(row: Row, m) -> None:
    row.diff_mean, row.diff_max, row.kl_k3 = float(m.abs_diff_mean), float(m.abs_diff_max), float(m.kl_k3)


def _weights(model) -> dict:
    """Copies of the full weights outside the embeddings (on the model's device), to compare after an update."""
    from rayrlhf.core.sharding import full_weights

    return {name: t.detach().float().clone() for name, t in full_weights(model) if "embed" not in name}


def _moved(before: dict, model) -> float:
    """The share of `before`'s elements that the model holds changed now."""
    from rayrlhf.core.sharding import full_weights

    changed = total = 0
    for name, t in full_weights(model):
        if name in before:
            changed += int((t.detach().float() != before[name]).sum())
            total += before[name].numel()
    return changed / max(total, 1)


def learner_logprobs(learner, exp):
    """The learner's log-probs of the batch before its update (B, R), in its own micro batches, as its proximal
    forward computes them."""
    import torch

    from rayrlhf.core.forward import response_logprobs

    learner.policy.eval()
    out = torch.zeros(exp.responses.shape)
    with torch.no_grad():
        for mb in learner.plan.cut(exp.prompts, exp.prompt_mask, exp.responses, exp.response_mask):
            lp, _ = response_logprobs(learner.policy, mb.prompts, mb.prompt_mask, mb.responses, mb.response_mask,
                                      learner.temperature, packed=learner.plan.packed, share_prompts=mb.one_pass)
            out[mb.rows, : lp.shape[1]] = lp.float().cpu()
    return out


def run_learner(row: Row, cfg, policy: Path, rm: Path, rollout, ref, scores, device: str, warm: bool,
                precision: str, max_abs_diff: float | None) -> None:
    """An update on the joined experience, on policy (mismatch, weights moved), and with `warm` a second of the
    same batch, one version stale, timed. Without the correction the mismatch is a forward of the policy before
    the update; with it, the learner's own `ppo/mismatch_*`."""
    from rayrlhf.core import ppo_math as pm
    from rayrlhf.core.experience import Experience
    from rayrlhf.roles.learner import PPOLearner

    learner = PPOLearner.from_config(cfg, str(policy), str(rm), device=device)
    exp = Experience.join([rollout], [ref], [scores], learner.tokenizer.pad_token_id)
    corrected = cfg.ppo.behaviour_is != "none"
    if not corrected:
        _mismatch(row, pm.mismatch(learner_logprobs(learner, exp), exp.logprobs, exp.response_mask.float()))
    policy_before, critic_before = _weights(learner.policy), _weights(learner.critic)
    first = learner.train_step(copy.deepcopy(exp))
    moved = min(_moved(policy_before, learner.policy), _moved(critic_before, learner.critic))
    del policy_before, critic_before
    second = learner.train_step(copy.deepcopy(exp)) if warm else first
    if corrected:
        row.diff_mean, row.diff_max = first["ppo/mismatch_abs_diff_mean"], first["ppo/mismatch_abs_diff_max"]
        row.kl_k3 = first["ppo/mismatch_kl_k3"]
    row.seconds, row.loss = second["timing/learner_s"], first["ppo/policy_loss"]
    row.tokens_per_s, row.mfu = second["perf/learner_tokens_per_s"], second["perf/learner_mfu"]
    row.note = (f"moved {moved:.1%}, clip {first['ppo/clip_fraction']:.3f}, first-minibatch max |dlogp| "
                f"{first['ppo/behaviour_logprob_max_diff']:.2e}")
    if corrected:
        row.note += f", IS w {first['ppo/is_weight_mean']:.4f} ESS {first['ppo/is_ess']:.4f}"
    bad = {k: v for m in (first, second) for k, v in m.items() if not finite(v)}
    if not row.check("finite", not bad, f"{bad}"):
        return
    row.check("weights moved", moved >= MIN_MOVED, f"{moved:.1%} of the policy's or critic's elements changed")
    check_mismatch(row, precision, max_abs_diff)
    if corrected:
        row.check("IS weights", first["ppo/is_ess"] >= MIN_IS_ESS, f"ESS {first['ppo/is_ess']:.3f}")


# --- the run ----------------------------------------------------------------------------------------

NO_CORRECTION = ("ppo.proximal_policy=false", "ppo.behaviour_is=none")
CORRECTION = ("ppo.proximal_policy=true", "ppo.behaviour_is=token")


def make_config(shape: Shape, precision: str, *extra: str):
    """The run's config: the packaged default with the GPU configs' dtype settings (`precision`), their PPO
    learning rates, and batches of `shape`; the learner cuts its batch in two minibatches of micro batches."""
    from rayrlhf.core.config import load_config

    B = 2 * shape.prompts
    bf16 = precision == "bf16"
    return load_config(None, [
        "model.dtype=float32", f"model.mixed_precision={'bf16' if bf16 else repr('no')}",
        f"model.inference_dtype={'bfloat16' if bf16 else 'float32'}",
        f"data.max_prompt_tokens={shape.prompt_tokens[1]}", f"data.max_summary_tokens={shape.summary_tokens[1] + 1}",
        f"sft.batch_size={B}", f"sft.micro_batch_size={shape.micro}", "sft.lr=1e-4",
        f"rm.batch_size={shape.prompts}", f"rm.micro_batch_size={max(1, shape.micro // 2)}", "rm.lr=1e-4",
        f"rollout.max_new_tokens={shape.new_tokens}", "rollout.temperature=0.7",
        f"reference.batch_size={shape.micro}", f"reward.batch_size={shape.micro}",
        f"ppo.prompts_per_step={shape.prompts}", "ppo.samples_per_prompt=2", f"ppo.minibatch_size={B // 2}",
        f"ppo.micro_batch_size={shape.micro}", "ppo.ppo_epochs=1", "ppo.lr=3e-6", "ppo.critic_lr=3e-6",
        "ppo.max_staleness=1", "ray.startup_timeout_s=300", *extra])


class Log:
    """Progress on stderr, with the seconds since the run began (the table goes to stdout)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def check_model(arch: Arch, shape: Shape, device: str, precision: str, max_abs_diff: float | None, tmp: Path,
                log: Log) -> list[Row]:
    """Every role on one model shape -> its rows, in `ROLES` order; a role whose input failed is failed too."""
    from rayrlhf.core.modeling import load_tokenizer

    rows = {role: Row(arch.name, role) for role in ROLES}
    warm = device == "cuda"  # a GPU's first call selects kernels and grows its allocator: time the second
    log(f"{arch.name}: random checkpoints")
    try:
        policy, rm = save_random_checkpoints(arch, tmp / arch.name, device)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        for row in rows.values():
            row.check("ran", False, f"random checkpoints: {type(e).__name__}: {e}"[:300])
        return list(rows.values())
    cfg = make_config(shape, precision)
    batches = Batches.draw(shape, arch.vocab, eos=load_tokenizer(str(policy)).eos_token_id)

    def step(role: str, run: Callable[[Row], T], *needs) -> T | None:
        if any(n is None for n in needs):
            rows[role].check("ran", False, "an earlier role it reads failed")
            return None
        log(f"{arch.name}: {role}")
        out = attempt(rows[role], run)
        free_memory(device)
        return out

    step("sft", lambda r: run_sft(r, cfg, policy, batches, device, tmp / arch.name / "sft"))
    step("rm", lambda r: run_rm(r, cfg, policy, batches, device, tmp / arch.name / "rm"))
    rollout = step("rollout", lambda r: run_rollout(r, cfg, policy, batches, warm))
    ref = step("reference", lambda r: run_reference(r, cfg, policy, rollout, device, warm, max_abs_diff), rollout)
    scores = step("reward", lambda r: run_reward(r, cfg, rm, rollout, device, warm), rollout)
    for role, extra in (("learner", NO_CORRECTION), ("learner+IS", CORRECTION)):
        learner_cfg = make_config(shape, precision, *extra)
        step(role, lambda r, c=learner_cfg: run_learner(r, c, policy, rm, rollout, ref, scores, device, warm, precision,
                                                        max_abs_diff), rollout, ref, scores)
    for row in rows.values():
        check_mfu(row, device)
    import shutil

    shutil.rmtree(tmp / arch.name, ignore_errors=True)  # a billion fp32 parameters twice: 8 GB of disk
    return list(rows.values())


def use_this_tree(tmp: Path) -> None:
    """Import `rayrlhf` from this tree, whose root is the package: where it is not installed (the GPU machine gets
    the files alone) or another copy is, a link named rayrlhf in `tmp` goes first on sys.path."""
    spec = importlib.util.find_spec("rayrlhf")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == ROOT / "__init__.py":
        return
    (tmp / "rayrlhf").symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(tmp))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: the GPU if one is visible, else the CPU")
    ap.add_argument("--size", choices=("toy", "real"), default=None,
                    help="real: SmolLM2-135M and Pythia-1B shapes; toy: tiny models of the same architectures "
                    "(default: real on a GPU, toy on the CPU)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="bf16: fp32 master weights, bf16 compute and inference (the GPU configs); fp32: all fp32")
    ap.add_argument("--max-abs-diff", type=float, default=None, metavar="NATS",
                    help=f"bound of the mismatch check's max |dlogp| (default: {MAX_ABS_DIFF['fp32']:g} in fp32, "
                    f"{MAX_ABS_DIFF['bf16']:g} in bf16)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows to PATH as data (bench/result_file.py)")
    args = ap.parse_args()
    if args.device == "cpu":  # before torch looks: FSDP's mesh and the group's backend follow any visible GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    size = args.size or ("real" if device == "cuda" else "toy")
    archs, shape = SIZES[size]
    machine = None
    if args.json:  # the machine's load before the run adds its own
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from result_file import describe_machine, write_result

        machine = describe_machine()
    log = Log()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        use_this_tree(Path(tmp))
        from rayrlhf.core.process import quiet_transformers
        from rayrlhf.core.throughput import peak_flops

        quiet_transformers()
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        peak = peak_flops(device, "bfloat16" if args.precision == "bf16" else "float32")
        log(f"{name}, torch {torch.__version__}, --size {size} --precision {args.precision}, peak "
            f"{peak / 1e12:.3g} TFLOP/s")
        rows = [row for arch in archs
                for row in check_model(arch, shape, device, args.precision, args.max_abs_diff, Path(tmp), log)]
        import torch.distributed as dist

        if dist.is_initialized():  # the trainers' group of one (mixed precision)
            dist.destroy_process_group()
    print(f"gpu_check on {name} ({device}), --size {size} --precision {args.precision}; MFU against "
          f"{peak / 1e12:.3g} TFLOP/s ({'bf16' if args.precision == 'bf16' else 'fp32'} peak); "
          f"{time.perf_counter() - log.t0:.0f} s", flush=True)
    status = report(rows)
    if args.json:
        write_result(args.json, "gpu_check", f"{name}; {machine}",
                     [{"model": r.model, "role": r.role, "s": r.seconds, "tokens/s": r.tokens_per_s, "MFU": r.mfu,
                       "loss": r.loss, "|dlogp| mean": r.diff_mean, "|dlogp| max": r.diff_max, "k3": r.kl_k3,
                       "failed": "; ".join(f"{c.name} ({c.detail})" for c in r.failed), "note": r.note}
                      for r in rows],
                     {"s": "{:.2f}", "tokens/s": "{:.0f}", "MFU": "{:.3f}", "loss": "{:.4f}", "|dlogp| mean": "{:.2e}",
                      "|dlogp| max": "{:.2e}", "k3": "{:.2e}"})
    return status


if __name__ == "__main__":
    sys.exit(main())
