"""What a command checks before it writes anything or starts Ray: a failed or mistaken command leaves a run
as it was, and bad inputs exit 2 naming the key, flag or file (no Ray started: these run in milliseconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rayrlhf.core.config import config_to_yaml, load_config
from rayrlhf.pipeline.cli import main, error_line

TINY = ["data.num_train_posts=96", "data.num_valid_posts=16", "data.num_test_posts=16", "data.num_train_pairs=64",
        "data.num_valid_pairs=16"]


def _run_dir(tmp_path: Path, *overrides: str) -> Path:
    """A run directory as `rayrlhf sft --run-dir R` leaves it before its first checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(load_config(None, [*TINY, *overrides])))
    return run


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failing_stage_command_leaves_the_run_config_untouched(tmp_path, capsys):
    run = _run_dir(tmp_path, "ppo.steps=12")
    before = _snapshot(tmp_path)
    assert main(["ppo", "--run-dir", str(run), "--sft-checkpoint", "/nonexistent"]) == 2
    assert "SFT checkpoint not found at /nonexistent" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(run)]) == 2
    assert "SFT checkpoint not found" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    assert yaml.safe_load((run / "config.yaml").read_text())["ppo"]["steps"] == 12


def test_train_with_another_config_on_an_existing_run_is_refused_naming_the_keys(tmp_path, capsys):
    run = _run_dir(tmp_path, "ppo.steps=12")
    before = _snapshot(tmp_path)
    argv = ["train", "--run-dir", str(run), *sum((["--set", o] for o in TINY), [])]
    assert main([*argv, "--set", "ppo.steps=40", "--set", "sft.lr=0.01"]) == 2
    assert "was started with another config (differs in ppo.steps, sft.lr)" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_the_same_config_or_only_another_ray_section_is_accepted(tmp_path):
    from rayrlhf.pipeline.preflight import run_config

    run = _run_dir(tmp_path, "ppo.steps=12")
    same = load_config(None, [*TINY, "ppo.steps=12", "ray.num_cpus=8", f"run.output_dir={tmp_path}"])
    assert run_config(run, same, True, "train")[1] == []
    cfg, diff = run_config(run, load_config(), False, "ppo")
    assert cfg.ppo.steps == 12 and diff == []  # the run's own config
    other = load_config(None, [*TINY, "ppo.steps=40"])
    assert run_config(run, other, True, "ppo") == (other, ["ppo.steps"])  # kept beside the PPO stage


def _local_files(tmp_path: Path, rows: int = 8) -> dict[str, Path]:
    posts = [{"prompt": f"SUBREDDIT: r/test\nTITLE: t{i}\nPOST: body {i}\nTL;DR:", "reference": f" s{i}"}
             for i in range(rows)]
    pairs = [{"prompt": p["prompt"], "chosen": " good", "rejected": " bad"} for p in posts]
    # held-out posts of their own: comparisons on evaluation posts never train a reward model
    test = [{**p, "prompt": p["prompt"].replace("TITLE: t", "TITLE: held-out ")} for p in posts]
    files = {}
    for key, content in (("sft_train", posts), ("sft_valid", posts), ("sft_test", test), ("pairs_train", pairs),
                         ("pairs_valid", pairs)):
        files[key] = tmp_path / f"{key}.jsonl"
        files[key].write_text("".join(json.dumps(r) + "\n" for r in content))
    return files


def _local_argv(tmp_path: Path, files: dict[str, Path], command: str = "sft") -> list[str]:
    argv = [command, "--run-dir", str(tmp_path / "run"), "--set", "data.source=local", "--set", "ppo.prompts_per_step=4",
            "--set", "ppo.minibatch_size=8", "--set", "ppo.micro_batch_size=8"]
    for key, path in files.items():
        argv += ["--set", f"data.{key}={path}"]
    return argv


@pytest.mark.parametrize("break_it, words", [
    (lambda f: f["sft_valid"].unlink(), "data.sft_valid: {sft_valid} does not exist"),
    (lambda f: (f["pairs_train"].unlink(), f["pairs_train"].mkdir()), "data.pairs_train: {pairs_train} is a directory"),
    (lambda f: f["sft_test"].write_text('{"prompt": "SUBREDDIT: r/x\\nPOST: y", "reference": 3}\n'),
     "{sft_test}: no usable rows"),
])
def test_bad_data_files_exit_2_before_anything_is_written(tmp_path, capsys, break_it, words):
    files = _local_files(tmp_path)
    break_it(files)
    assert main(_local_argv(tmp_path, files)) == 2
    err = capsys.readouterr().err
    assert words.format(**{k: str(v) for k, v in files.items()}) in err, err
    assert not (tmp_path / "run").exists()


def test_too_few_ppo_prompts_in_local_data_exit_2(tmp_path, capsys):
    files = _local_files(tmp_path, rows=3)
    assert main(_local_argv(tmp_path, files, "train")) == 2
    assert "ppo.prompts_per_step 4 exceeds the 3 PPO prompts in data.sft_train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_local_model_whose_positions_do_not_hold_the_budgets_exits_2(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    assert main(["sft", "--run-dir", str(tmp_path / "run"), "--set", f"model.name_or_path={model}"]) == 2
    assert f"exceeds the 128 positions of model.name_or_path {model}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_budgets_beyond_the_builtin_models_positions_exit_2(tmp_path, capsys):
    argv = ["sft", "--run-dir", str(tmp_path / "run"), "--set", "data.max_prompt_tokens=500",
            "--set", "model.max_position_embeddings=512"]
    assert main(argv) == 2
    assert "= 532 exceeds model.max_position_embeddings 512" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_error_inside_an_actor_is_one_line_naming_where():
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("SFTStage.run", "Traceback ...\n  \x1b[36mlong\x1b[0m", ValueError("sft.batch_size 64 exceeds "
                                                                                        "the 10 training examples"))
    assert error_line(wrapped) == "sft.batch_size 64 exceeds the 10 training examples (in SFTStage.run)"
    assert error_line(TimeoutError("learner did not finish\nmore")) == "TimeoutError: learner did not finish"
    # what ray.get raises: the RayTaskError as an instance of its cause's type
    as_cause = RayTaskError("RMStage.run", "Traceback ...", KeyError("rm/valid_accuracy")).as_instanceof_cause()
    assert isinstance(as_cause, KeyError)
    assert error_line(as_cause).startswith("KeyError: 'rm/valid_accuracy'")


def test_one_posts_file_and_one_pairs_file_are_checked_by_their_keys(tmp_path, capsys):
    files = _local_files(tmp_path, rows=20)
    one = {"posts_file": files["sft_train"], "pairs_file": tmp_path / "missing.jsonl"}
    assert main(_local_argv(tmp_path, one)) == 2
    assert f"data.pairs_file: {tmp_path / 'missing.jsonl'} does not exist" in capsys.readouterr().err
    one["pairs_file"] = files["pairs_train"]
    # 20 posts, 10% held out for tests and 10% for validation: 16 PPO prompts, fewer than 32 asked for
    argv = [*_local_argv(tmp_path, one, "train"), "--set", "ppo.prompts_per_step=32", "--set", "ppo.minibatch_size=64",
            "--set", "ppo.micro_batch_size=64"]
    assert main(argv) == 2
    assert "exceeds the 16 PPO prompts in data.posts_file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_judge_without_its_comparisons_exits_2(tmp_path, capsys):
    assert main(["judge", "--run-dir", str(tmp_path / "run")]) == 2
    assert "set data.judge_fraction" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--set", f"eval.judge_checkpoint={tmp_path}/nope"]) == 2
    assert f"eval.judge_checkpoint judge checkpoint not found at {tmp_path}/nope" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_reads_the_checkpoints_ppo_started_from(tmp_path):
    """A run whose PPO started from outside checkpoints (`ppo --sft-checkpoint ... --rm-checkpoint ...`) is
    evaluated against them: they are what its reference and reward were."""
    from rayrlhf.core.config import load_config
    from rayrlhf.pipeline.preflight import check_inputs
    from rayrlhf.pipeline.run_dir import RunDir

    outside = {name: tmp_path / "other" / name / "checkpoint" for name in ("sft", "rm")}
    configs = {"sft": {"architectures": ["LlamaForCausalLM"]},
               "rm": {"architectures": ["LlamaForSequenceClassification"], "num_labels": 1, "reward_bias": 0.5}}
    for name, path in outside.items():
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(configs[name]))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    with pytest.raises(Exception, match="SFT checkpoint not found"):
        check_inputs(load_config(None), "eval", run.path, None, None)
    run.record_inputs("ppo", sft_checkpoint=outside["sft"], rm_checkpoint=outside["rm"])
    assert run.evaluated_checkpoints() == (outside["sft"].resolve(), outside["rm"].resolve())
    check_inputs(load_config(None), "eval", run.path, None, None)


@pytest.mark.slow  # the tiny checkpoints
def test_a_checkpoint_of_the_wrong_kind_is_refused(tmp_path, capsys, tiny_checkpoints):
    """A policy where a reward model belongs (or the reverse) loads with a random head and runs without an error:
    refused before anything starts, naming the flag and what the folder holds; nothing written."""
    import shutil

    sft, rm = str(tiny_checkpoints.sft), str(tiny_checkpoints.rm)
    run = tmp_path / "run"
    cases = [
        (["ppo", "--run-dir", str(run), "--sft-checkpoint", rm, "--rm-checkpoint", rm],
         f"--sft-checkpoint {rm} holds LlamaForSequenceClassification, not a policy"),
        (["ppo", "--run-dir", str(run), "--sft-checkpoint", sft, "--rm-checkpoint", sft],
         f"--rm-checkpoint {sft} holds LlamaForCausalLM, not a reward model"),
        (["rm", "--run-dir", str(run), "--sft-checkpoint", rm], "not a policy"),
        (["serve", "--checkpoint", sft], "--checkpoint"),
    ]
    no_bias = tmp_path / "no_bias"
    shutil.copytree(rm, no_bias)
    config = json.loads((no_bias / "config.json").read_text())
    del config["reward_bias"]
    (no_bias / "config.json").write_text(json.dumps(config))
    cases.append((["ppo", "--run-dir", str(run), "--sft-checkpoint", sft, "--rm-checkpoint", str(no_bias)],
                  "has no reward_bias"))
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err, err
    assert not run.exists()


@pytest.mark.parametrize("value, words", [
    ("{tmp}/nowhere", "model.name_or_path '{tmp}/nowhere': {tmp}/nowhere does not exist"),
    ("{tmp}/empty", "model.name_or_path '{tmp}/empty': the folder {tmp}/empty has no config.json"),
    ("{tmp}/empty/weights.bin", "{tmp}/empty/weights.bin is a file, not a Hugging Face model folder"),
    ("package:configs", "model.name_or_path 'package:configs': the folder "),  # the package folder, not a file in it
    ("package:PyYAML/model.gguf", "PyYAML is the name of the distribution; package: takes its import name: "
                                  "package:yaml/model.gguf"),
])
def test_a_base_model_that_is_not_there_exits_2_before_anything_is_written(tmp_path, capsys, value, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"")
    run = tmp_path / "run"
    assert main(["sft", "--run-dir", str(run), "--set", f"model.name_or_path={value.format(tmp=tmp_path)}"]) == 2
    err = capsys.readouterr().err
    assert words.format(tmp=tmp_path) in err and "--resume" not in err, err
    assert not run.exists()


def test_a_missing_tokenizer_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--set", f"model.tokenizer={tmp_path}/tok"]) == 2
    assert f"model.tokenizer '{tmp_path}/tok': {tmp_path}/tok does not exist" in capsys.readouterr().err
    assert not run.exists()


def test_a_hub_id_is_checked_and_the_error_says_what_was_tried(tmp_path, capsys, monkeypatch):
    """Not a local path: the hub's local cache, then the hub; offline (or the hub unreachable) the error says so."""
    from huggingface_hub import HfApi, constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = ["sft", "--run-dir", str(tmp_path / "run"), "--set", "model.name_or_path=no-such-org/no-such-model"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("model.name_or_path 'no-such-org/no-such-model': not a local path (no "
            f"{tmp_path}/no-such-org/no-such-model), nor a Hugging Face hub id in the local cache") in err, err
    assert "the hub is not asked offline (HF_HUB_OFFLINE=1)" in err

    def unreachable(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    assert main(argv) == 2
    assert "the hub could not be reached (ConnectionError: [Errno 111] Connection refused)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_strict_over_long_row_is_found_before_anything_is_written(tmp_path):
    """A query that cannot be cut to data.max_prompt_tokens (not in the TL;DR format) fails data.strict in preflight,
    naming its file and row, with the tokenizer the SFT stage would train; lax mode skips it in the stage."""
    from rayrlhf.pipeline.preflight import PreflightError, check_inputs

    files = _local_files(tmp_path)
    rows = files["sft_train"].read_text().splitlines()
    rows[3] = json.dumps({"prompt": " ".join(f"word{i}" for i in range(200)), "reference": " s"})
    files["sft_train"].write_text("\n".join(rows) + "\n")
    overrides = [f"data.{k}={v}" for k, v in files.items()] + [
        "data.source=local", "data.max_prompt_tokens=64", "ppo.prompts_per_step=4", "ppo.minibatch_size=8",
        "ppo.micro_batch_size=8"]
    check_inputs(load_config(None, overrides), "sft", None, None, None)  # lax: the stage skips the row
    with pytest.raises(PreflightError, match=rf"^data.strict: {files['sft_train']}:3: query of \d+ tokens exceeds 64"):
        check_inputs(load_config(None, [*overrides, "data.strict=true"]), "sft", None, None, None)


def test_eval_without_a_run_directory_asks_for_one(capsys):
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "rayrlhf eval: error: --run-dir is required" in err and "checkpoint" not in err, err


def test_ctrl_c_is_one_line_with_the_resume_command_and_exit_130(tmp_path, capsys, monkeypatch):
    from rayrlhf.pipeline import workflow

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "sft", interrupted)
    monkeypatch.setattr(workflow, "shutdown", lambda: None)
    run = tmp_path / "run"
    assert main(["sft", "--run-dir", str(run), *sum((["--set", o] for o in TINY), [])]) == 130
    assert capsys.readouterr().err == f"rayrlhf sft: interrupted (continue with `rayrlhf sft --resume {run}`)\n"
    # a new run directory, named when it is made
    assert main(["sft", "--set", f"run.output_dir={tmp_path / 'runs'}", *sum((["--set", o] for o in TINY), [])]) == 130
    made = next((tmp_path / "runs").iterdir())
    assert capsys.readouterr().err == f"rayrlhf sft: interrupted (continue with `rayrlhf sft --resume {made}`)\n"
