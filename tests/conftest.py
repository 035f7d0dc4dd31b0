"""Shared fixtures: offline, token-authenticated Ray, a tiny config and tiny SFT/RM checkpoints trained once.

The environment is set at import time, before any test module imports ray or transformers: Ray 2.60 reads
RAY_AUTH_MODE / RAY_AUTH_TOKEN when it is first imported, and the Hugging Face libraries read HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
import secrets
import sys

if "ray" in sys.modules:  # too late: Ray has already read its auth settings
    raise RuntimeError("ray was imported before tests/conftest.py could set RAY_AUTH_MODE/RAY_AUTH_TOKEN")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Token auth chosen deliberately (not left to Ray's default), with a fresh token per test session.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402

# ../shared/data next to the repository; tests that need it skip when it is absent.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A model and data small enough that SFT + RM train in seconds on one CPU core.
TINY_OVERRIDES = [
    "model.name_or_path=builtin:tiny-llama",
    "model.hidden_size=64",
    "model.num_heads=2",  # head_dim 32
    "model.num_layers=1",
    "model.intermediate_size=128",
    "model.vocab_size=400",
    "data.num_train_posts=96",
    "data.num_valid_posts=16",
    "data.num_test_posts=16",
    "data.num_train_pairs=96",
    "data.num_valid_pairs=32",
    "data.max_prompt_tokens=128",
    "data.max_summary_tokens=24",
    "sft.epochs=1",
    "sft.batch_size=16",
    "sft.micro_batch_size=8",
    "sft.eval_every=100",
    "sft.num_eval_prompts=8",
    "sft.num_cpus=1",
    "rm.epochs=1",
    "rm.batch_size=16",
    "rm.micro_batch_size=8",
    "rm.eval_every=100",
    "rm.num_cpus=1",
    "ppo.steps=2",
    "ppo.prompts_per_step=8",
    "ppo.samples_per_prompt=2",
    "ppo.minibatch_size=8",
    "ppo.micro_batch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.num_cpus=1",
    "ppo.sync_timeout_s=120",
    "rollout.max_new_tokens=12",
    "rollout.num_cpus=1",
    "reward.num_cpus=1",
    "reference.num_cpus=1",
    "eval.num_prompts=8",
    "eval.num_samples_shown=2",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """The `--set` items of the tiny config, for CLI runs."""
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def make_tiny_cfg():
    """tiny config + extra `--set` overrides -> Config (later overrides win)."""

    def make(*extra: str) -> Config:
        return load_config(None, [*TINY_OVERRIDES, *extra])

    return make


@pytest.fixture(scope="session")
def tiny_cfg(make_tiny_cfg) -> Config:
    return make_tiny_cfg()


@dataclass(frozen=True)
class Checkpoints:
    sft: Path
    rm: Path


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_cfg, tmp_path_factory) -> Checkpoints:
    """Tiny SFT and reward-model checkpoints, trained once per session with the plain trainers (no Ray)."""
    from pipeline.rm import RMTrainer
    from pipeline.sft import SFTTrainer

    root = tmp_path_factory.mktemp("tiny_ckpt")
    SFTTrainer(tiny_cfg, root / "sft").run()
    sft = root / "sft" / "checkpoint"
    RMTrainer(tiny_cfg, root / "rm", sft).run()
    return Checkpoints(sft, root / "rm" / "checkpoint")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds); shut down at the end."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tldr").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_data, tmp_path_factory) -> Path:
    """A GPT-2 tokenizer saved in HF format from the shared vocab.json/merges.txt (no hub access)."""
    src = shared_data / "tokenizer_gpt2"
    if not (src / "vocab.json").is_file() or not (src / "merges.txt").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {src}")
    from transformers import GPT2TokenizerFast

    # Positional on purpose: transformers 5 ignores vocab_file=/merges_file= keywords (an empty tokenizer).
    tok = GPT2TokenizerFast(str(src / "vocab.json"), str(src / "merges.txt"))
    assert len(tok) == 50257, f"GPT-2 tokenizer from {src} has {len(tok)} tokens"
    out = tmp_path_factory.mktemp("gpt2_tokenizer")
    tok.save_pretrained(out)
    return out
