"""`rayrlhf submit` and `rayrlhf jobs` against a real local Ray head with token auth and its dashboard.

The head is started once for the module (`ray start --head --block` from this venv, so `rayrlhf` is
importable by job drivers, as on a cluster built from an image with the package). It is stopped by
signalling its own process group, not with `ray stop`, which kills every Ray process of this user on the
machine (other engineers' tests included).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from raynodes import LocalCluster, free_ports, local_cluster, wait_terminal
from rayrlhf.pipeline.cli import main
from rayrlhf.pipeline.jobs import DashboardError, auth_token, job_entrypoint, job_runtime_env

# One worker runs the module: its Ray head (a module fixture) would otherwise start on both.
pytestmark = pytest.mark.xdist_group("jobs")

VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 120.0

TINY = [
    "model.hidden_size=64", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=128",
    "model.vocab_size=400", "data.num_train_posts=64", "data.num_valid_posts=16", "data.num_test_posts=16",
    "data.num_train_pairs=64", "data.num_valid_pairs=16", "sft.epochs=1", "rm.epochs=1", "sft.batch_size=16",
    "sft.micro_batch_size=16", "rm.batch_size=16", "rm.micro_batch_size=16", "sft.num_eval_prompts=4",
    "eval.num_prompts=4", "ppo.steps=2", "ppo.prompts_per_step=4", "ppo.samples_per_prompt=2",
    "ppo.minibatch_size=8", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "rollout.max_new_tokens=8",
    "sft.num_cpus=1", "rm.num_cpus=1", "rollout.num_cpus=1", "reward.num_cpus=1", "reference.num_cpus=1",
    "ppo.num_cpus=1", "serve.num_cpus=1",
]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def head() -> Iterator[LocalCluster]:
    with local_cluster(head_cpus=4) as cluster:
        yield cluster


def _cpus_in_use(head: LocalCluster) -> float:
    r = requests.get(f"{head.address}/api/cluster_status", headers={"Authorization": f"Bearer {head.token}"}, timeout=10)
    r.raise_for_status()
    used, _total = r.json()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]["CPU"]
    return used


def _wait_terminal(head: LocalCluster, job_id: str) -> str:
    return wait_terminal(head, job_id, JOB_TIMEOUT_S)


@pytest.mark.slow
def test_bad_config_exits_2_before_anything_is_sent(head: LocalCluster, capsys) -> None:
    before = len(head.client().list_jobs())
    assert main(["submit", "--address", head.address, "--set", "sft.batch_size=3"]) == 2
    assert "sft.batch_size" in capsys.readouterr().err
    assert len(head.client().list_jobs()) == before


@pytest.mark.slow
@pytest.mark.outside_ci  # CI: a submitted job joining the cluster in the stop test below; one SUCCEEDED in test_multinode
def test_submit_tiny_sft_job_succeeds(head: LocalCluster, tmp_path: Path, capsys) -> None:
    argv = ["submit", "--address", head.address, "--command", "sft", *_sets([*TINY, f"run.output_dir={tmp_path}"])]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0]
    assert job_id.startswith("raysubmit_"), out[:500]
    assert f"job {job_id} SUCCEEDED" in err
    # The job driver joined this cluster through the RAY_ADDRESS Ray gives it (GCS at the head's --port),
    # instead of starting a Ray of its own.
    assert "connecting to Ray at" in out and f":{head.gcs_port}" in out, out[-3000:]
    assert "Started a local Ray instance" not in out
    # It ran the validated config that was sent, not the packaged default.
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "sft" / "checkpoint").is_dir()
    assert "hidden_size: 64" in (run_dir / "config.yaml").read_text()

    assert main(["jobs", "status", job_id, "--address", head.address]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"


@pytest.mark.slow
def test_runtime_failure_on_the_cluster_fails_the_job(head: LocalCluster, tmp_path: Path, capsys) -> None:
    # Valid here (paths are not checked when loading: they are the cluster's), missing on the cluster.
    bad = ["data.source=local", "data.sft_train=/nonexistent/train.jsonl", "data.sft_valid=/nonexistent/valid.jsonl",
           "data.sft_test=/nonexistent/test.jsonl", f"run.output_dir={tmp_path}"]
    assert main(["submit", "--address", head.address, "--command", "sft", *_sets([*TINY, *bad])]) == 1
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0]
    assert f"job {job_id} FAILED" in err

    assert main(["jobs", "status", job_id, "--address", head.address]) == 0
    assert capsys.readouterr().out.strip() == "FAILED"
    assert main(["jobs", "logs", job_id, "--address", head.address]) == 0
    logs = capsys.readouterr().out
    assert "/nonexistent/" in logs and "rayrlhf sft: error" in logs, logs[-3000:]


@pytest.mark.slow
def test_config_error_on_the_cluster_side_is_in_the_job_logs(head: LocalCluster, capsys) -> None:
    # What a cluster with a different rayrlhf version (other config keys) would do: submit_main validates
    # first, so go around it with the SDK.
    job_id = head.client().submit_job(entrypoint="rayrlhf sft --set sft.batch_size=3",
                                      runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    assert _wait_terminal(head, job_id) == "FAILED"
    assert main(["jobs", "status", job_id, "--address", head.address]) == 0
    assert capsys.readouterr().out.strip() == "FAILED"
    assert main(["jobs", "logs", job_id, "--address", head.address]) == 0
    logs = capsys.readouterr().out
    assert "invalid config" in logs and "sft.batch_size" in logs, logs[-3000:]


@pytest.mark.slow
def test_jobs_stop_stops_a_running_pipeline(head: LocalCluster, tmp_path: Path, capsys) -> None:
    long_run = [*TINY, "sft.epochs=100000", f"run.output_dir={tmp_path}"]
    assert main(["submit", "--address", head.address, "--command", "sft", "--no-wait", *_sets(long_run)]) == 0
    job_id = capsys.readouterr().out.strip()
    client = head.client()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "SFT:" not in client.get_job_logs(job_id):  # training has started inside the SFT actor
        assert client.get_job_status(job_id).value in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline, "the SFT stage did not start"
        time.sleep(1)
    # The job driver joined this cluster through the RAY_ADDRESS Ray gives it (GCS at the head's --port), instead
    # of starting a Ray of its own.
    logs = client.get_job_logs(job_id)
    assert "connecting to Ray at" in logs and f":{head.gcs_port}" in logs, logs[-3000:]
    assert "Started a local Ray instance" not in logs

    assert main(["jobs", "stop", job_id, "--address", head.address]) == 0
    assert capsys.readouterr().out.strip() == "STOPPED"
    assert client.get_job_status(job_id).value == "STOPPED"
    # The SFT actor died with its driver: the cluster's CPUs are free again.
    deadline = time.monotonic() + 30
    while _cpus_in_use(head) > 0:
        assert time.monotonic() < deadline, f"{_cpus_in_use(head)} CPUs still held after the job was stopped"
        time.sleep(1)


@pytest.mark.slow
def test_wrong_token_is_a_clear_error(head: LocalCluster, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "status", "raysubmit_x", "--address", head.address]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and head.address in err and "RAY_AUTH_TOKEN" in err


@pytest.mark.slow
def test_unknown_job_id_is_a_clear_error(head: LocalCluster, capsys) -> None:
    assert main(["jobs", "status", "raysubmit_nosuchjob", "--address", head.address]) == 1
    err = capsys.readouterr().err
    assert "raysubmit_nosuchjob" in err and "Traceback" not in err


@pytest.mark.slow
def test_unreachable_address_exits_1_with_a_message() -> None:
    (port,) = free_ports(1)  # nothing listens there
    address = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (["submit", "--address", address, "--command", "sft"], ["jobs", "status", "raysubmit_x", "--address", address]):
        r = subprocess.run([str(VENV_BIN / "rayrlhf"), *argv], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1, r.stderr
        assert f"cannot reach the Ray dashboard at {address}" in r.stderr
        assert "Traceback" not in r.stderr


def test_address_without_scheme_is_a_usage_error(capsys) -> None:
    assert main(["jobs", "status", "raysubmit_x", "--address", "127.0.0.1:8265"]) == 2
    assert "http://" in capsys.readouterr().err


def test_auth_token_precedence(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    named = tmp_path / "tok"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    named.write_text("")
    with pytest.raises(DashboardError, match="empty"):  # as in Ray: no silent fall-back to ~/.ray/auth_token
        auth_token()


def test_entrypoint_quotes_overrides_for_the_shell() -> None:
    assert job_entrypoint("sft", ["run.name=a b", "sft.lr=1e-4"], None) == \
        "rayrlhf sft --config job_config.yaml --set 'run.name=a b' --set sft.lr=1e-4"
    assert job_entrypoint("train", ["ignored=1"], None, resume_from="/mnt/runs/my run") == \
        "rayrlhf train --resume '/mnt/runs/my run'"


def test_a_run_logging_to_wandb_hands_its_wandb_variables_to_the_job(monkeypatch, tmp_path: Path) -> None:
    """The stages log to W&B from actors on the cluster's nodes, which do not inherit the submitting shell's
    environment: the job's runtime env carries the W&B variables set here, and only when the run logs to W&B."""
    from rayrlhf.core.config import load_config

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = job_runtime_env(tmp_path, load_config(None, ["run.loggers=[tensorboard,wandb]"]))
    assert env == {"working_dir": str(tmp_path), "env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                                              "WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}}
    assert job_runtime_env(tmp_path, load_config(None, []))["env_vars"] == {"TOKENIZERS_PARALLELISM": "false"}
