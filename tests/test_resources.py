"""Resources that cannot exist: a local Ray's are known before it starts (exit 2 naming the key, nothing on
disk); a cluster that cannot place a stage fails within `ray.startup_timeout_s` naming the role and resource;
`rayrlhf scale` fails fast on an address nothing answers at and is bounded by what the cluster can place."""

from __future__ import annotations

import socket

import pytest

from rayrlhf.core.config import load_config
from rayrlhf.core.scaling import placeable
from rayrlhf.pipeline.cli import main
from rayrlhf.pipeline.resources import MAX_CPUS_PER_CORE, local_cpus, role_bundles, shortfall, stage_bundles

TINY = ["data.num_train_posts=96", "data.num_valid_posts=16", "data.num_test_posts=16", "data.num_train_pairs=64",
        "data.num_valid_pairs=16"]


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("rayrlhf.pipeline.preflight.local_gpus", lambda: 0)


def test_shortfall_names_each_roles_ask_and_key():
    bundles = {"learner": [{"CPU": 2, "GPU": 1}] * 2, "rollout": [{"CPU": 1, "GPU": 0.5}] * 3,
               "reward": [{"CPU": 1}]}
    # 8 CPUs; GPUs: 2 whole, and three halves take two GPUs (two share one, the third has one of its own)
    assert shortfall(bundles, {"CPU": 8, "GPU": 4}) is None
    short = shortfall(bundles, {"CPU": 8, "GPU": 3})
    assert short == ("4 GPU (learner ppo.num_gpus=1 x ppo.learner_workers=2, rollout rollout.num_gpus=0.5 x "
                     "rollout.num_workers=3) but 3 exist")
    assert shortfall({"eval": [{"CPU": 1}]}, {"CPU": 0.5}) == "1 CPU (eval eval.num_cpus=1) but 0.5 exist"


def test_fractional_gpus_share_a_gpu_only_where_they_fit_in_it():
    """Ray places each fractional ask on one GPU: three 0.6 asks and a 0.2 sum to 2.0 but need 3 GPUs."""
    from rayrlhf.pipeline.resources import gpus_needed

    def of(*gpus: float) -> dict:
        return {"rollout": [{"CPU": 1, "GPU": g} for g in gpus]}

    assert gpus_needed(of(0.6, 0.6, 0.6, 0.2)) == 3  # 0.6+0.2 | 0.6 | 0.6
    assert gpus_needed(of(0.5, 0.5, 0.25, 0.25)) == 2 and gpus_needed(of(*(0.25,) * 4)) == 1
    assert gpus_needed(of(2, 1, 0.5)) == 4 and gpus_needed(of()) == 0
    assert shortfall(of(0.6, 0.6, 0.6, 0.2), {"CPU": 8, "GPU": 2}).startswith("3 GPU (")


def test_each_stage_of_a_command_is_its_own_placement():
    cfg = load_config(None, ["sft.num_gpus=1", "sft.workers=2", "sft.batch_size=64", "ppo.num_gpus=1"])
    stages = stage_bundles(cfg, "train")
    assert list(stages) == ["sft", "rm", "ppo", "eval"]  # no judge without comparisons kept for it
    assert list(stage_bundles(load_config(None, ["data.judge_fraction=0.5"]), "train")) == [
        "sft", "rm", "judge", "ppo", "eval"]
    assert stages["sft"] == {"sft": [{"CPU": cfg.sft.num_cpus, "GPU": 1}] * 2}
    assert stages["ppo"] == role_bundles(cfg)
    assert list(stage_bundles(cfg, "ppo")) == ["ppo"]


def test_a_local_ray_is_bounded_by_the_machine(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert local_cpus(load_config()) == 4  # the default roles ask for 4 logical CPUs: 2 per core
    assert local_cpus(load_config(None, ["rollout.num_workers=1000"])) == 2 * MAX_CPUS_PER_CORE
    assert local_cpus(load_config(None, ["rollout.num_workers=1000", "ray.num_cpus=2000"])) == 2000


@pytest.mark.parametrize("override, key", [
    ("sft.num_gpus=1", "sft stage asks this machine's local Ray for 1 GPU (sft sft.num_gpus=1 x sft.workers=1)"),
    ("ppo.num_gpus=1", "ppo stage asks this machine's local Ray for 1 GPU (learner ppo.num_gpus=1"),
    ("rollout.num_workers=1000", "rollout rollout.num_cpus=1 x rollout.num_workers=1000) but 8 exist; a local Ray "
                                 "gets at most 4 logical CPUs per core (2 cores here)"),
])
def test_resources_a_local_ray_will_not_have_exit_2_before_anything_is_written(
        tmp_path, capsys, monkeypatch, no_cluster, override, key):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("ray.init", _no_ray)
    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), *sum((["--set", o] for o in [*TINY, override]), [])])
    err = capsys.readouterr().err
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()  # found before Ray (ray.init would raise) and before the run directory


def test_the_gpus_a_local_ray_has_are_enough(monkeypatch, no_cluster):
    from rayrlhf.pipeline.preflight import check_resources

    monkeypatch.setattr("rayrlhf.pipeline.preflight.local_gpus", lambda: 1)
    check_resources(load_config(None, ["sft.num_gpus=1", "rm.num_gpus=1", "ppo.num_gpus=0.5",
                                       "reference.num_gpus=0.25", "reward.num_gpus=0.25"]), "train")


def test_a_resumed_run_is_checked_too(tmp_path, capsys, no_cluster):
    from rayrlhf.core.config import config_to_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(load_config(None, [*TINY, "ppo.num_gpus=1"])))
    assert main(["ppo", "--resume", str(run)]) == 2
    assert "ppo.num_gpus=1" in capsys.readouterr().err


def _no_ray(*args, **kwargs):
    raise AssertionError("ray.init was called: the check must come before Ray starts")


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("address, words", [
    ("http://127.0.0.1:8265", "is a dashboard URL"),
    ("127.0.0.1:", "is not a Ray address"),
    ("127.0.0.1:99999", "is not a Ray address"),
    ("127.0.0.1:6379\u00b2", "is not a Ray address"),  # a digit to str.isdigit, not to int()
    (None, "nothing answers at 127.0.0.1:"),
])
def test_scale_fails_fast_on_an_address_nothing_can_connect_to(capsys, monkeypatch, address, words):
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", _no_ray)  # refused before Ray's minutes of retries begin
    address = address or f"127.0.0.1:{_dead_port()}"
    assert main(["scale", "--run", "x", "--workers", "2", "--address", address]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_a_stage_command_fails_fast_on_a_dead_cluster_address(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_dead_port()}")
    monkeypatch.setattr("ray.init", _no_ray)
    run = tmp_path / "run"
    assert main(["sft", "--run-dir", str(run), *sum((["--set", o] for o in TINY), [])]) == 2
    assert "RAY_ADDRESS: nothing answers at" in capsys.readouterr().err and not run.exists()


def test_placeable_counts_whole_workers():
    import sys

    assert placeable({}, {"CPU": 0}) == sys.maxsize  # rollout.num_cpus 0: a worker asks for nothing
    assert placeable({"CPU": 1}, {"CPU": 3.5}) == 3
    assert placeable({"CPU": 1, "GPU": 1}, {"CPU": 8, "GPU": 2}) == 2
    assert placeable({"CPU": 1, "GPU": 1}, {"CPU": 8}) == 0
    assert placeable({"CPU": 0.5}, {"CPU": 1.5}) == 3


def test_an_unplaceable_stage_fails_within_the_startup_timeout_naming_role_and_resource(ray_local, tmp_path):
    """On a cluster (here the tests' 4-CPU, 0-GPU Ray) nothing is known before connecting: the stage's
    placement is given `ray.startup_timeout_s`, then removed, and the error names the role, the key and what
    the cluster has."""
    import ray

    from rayrlhf.pipeline.workflow import run_sft

    cfg = load_config(None, [*TINY, "sft.num_gpus=1", "ray.startup_timeout_s=3"])
    with pytest.raises(RuntimeError) as e:  # after the 3 s it was given, not never
        run_sft(cfg, tmp_path / "sft")
    assert str(e.value) == ("Ray could not place sft within ray.startup_timeout_s=3s: they ask for 1 GPU "
                            "(sft sft.num_gpus=1 x sft.workers=1) but 0 exist in this cluster (lower those keys or add nodes "
                            "that have them)")
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def test_scale_is_bounded_by_what_the_cluster_can_place(ray_local, capsys):
    import ray

    from rayrlhf.actors import RolloutScaler
    from rayrlhf.core.scaling import SCALER_NAMESPACE, scaler_name

    scaler = RolloutScaler.options(name=scaler_name("bounded-run"), namespace=SCALER_NAMESPACE).remote(
        1, "object_store", {"CPU": 1.0})
    try:
        free = int(ray.available_resources().get("CPU", 0))
        assert main(["scale", "--run", "bounded-run", "--workers", "50"]) == 2
        err = capsys.readouterr().err
        assert f"the cluster can place {free} more rollout worker(s) now (each asks CPU 1; free: CPU {free}" in err
        assert f"--workers at most {1 + free}" in err
        assert ray.get(scaler.get_desired.remote()) == 1
        assert main(["scale", "--run", "bounded-run", "--workers", str(1 + free)]) == 0
        assert main(["scale", "--run", "bounded-run", "--workers", "50", "--wait-for-nodes"]) == 0
        assert ray.get(scaler.get_desired.remote()) == 50
    finally:
        ray.kill(scaler)


def test_address_auto_without_a_recorded_cluster_is_one_line(monkeypatch):
    """Ray's own lookup raises ConnectionError when `ray start` recorded no cluster: that is one line too."""
    import ray._private.services as services

    from rayrlhf.pipeline.cluster import AddressError, check_address

    def nothing_recorded(address, temp_dir=None):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", nothing_recorded)
    with pytest.raises(AddressError, match="address auto: no running Ray cluster is recorded"):
        check_address("auto")
