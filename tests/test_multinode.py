"""PPO on a real multi-node Ray cluster on this machine (tests/raynodes.py), submitted with `rayrlhf submit`.

Nodes: a head (the job's driver) and worker nodes started with custom resources, one per role group, as KubeRay
worker groups would be: `learner-a` and `learner-b` ({learner_node: 1} each), `rollout` ({rollout_node: 2}) and
`scorers` ({scorer_node: 2}). The roles ask for those resources (`<role>.resources`), so the learner group's two
ranks land on two nodes, the rollout workers on a third, the reference and the reward scorer on a fourth.

Every run is the same tiny PPO (4 steps, a checkpoint after each), so each must end with the weights of one
uninterrupted run on a single-node Ray: the roles' placement, the transport (the object store, or the gloo
group of the collective weight sync) and node failures change where the work runs, not what it computes.

Node failures are SIGKILLs of a node's whole process group (raylet, agents, workers) under Ray's default health
checks: (a) the node holding the rollout workers: Ray moves their placement bundles to a surviving node and
restarts them there, the driver dispatches their lost work again; (b) a node holding a learner rank: the job
starts its roles again and goes on from its last checkpoint by itself (`ppo.max_learner_restarts`), on a
node that joins after the kill (as a KubeRay worker group replaces a lost pod).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from raynodes import LocalCluster, local_cluster, wait_terminal
from rayrlhf.core.metrics import read_metrics
from rayrlhf.pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multinode")]

SIZES = ["ppo.steps=4", "ppo.checkpoint_every=1", "ppo.learner_workers=2", "rollout.num_workers=2",
         "rollout.num_cpus=0.5", "reference.num_cpus=0.5", "reward.num_cpus=0.5",  # 4 CPUs, as a one-node Ray here
         "run.keep_checkpoints=0", "ray.startup_timeout_s=240"]
PLACED = ["ppo.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}",
          "reference.resources={scorer_node: 1}", "reward.resources={scorer_node: 1}"]
ROLE_OF_CLASS = {"LearnerWorker": "learner", "RolloutWorker": "rollout", "ReferenceWorker": "reference",
                 "RewardWorker": "reward"}
JOB_TIMEOUT_S = 600.0


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _max_weight_diff(a: Path, b: Path) -> float:
    """Max abs difference over the final policy and critic of two PPO runs."""
    diffs = []
    for part in ("checkpoint", "critic"):
        x, y = _weights(a / "ppo" / part), _weights(b / "ppo" / part)
        assert x.keys() == y.keys()
        diffs += [(x[k] - y[k]).abs().max().item() for k in x]
    return max(diffs)


def _run_dir(root: Path, ckpts) -> Path:
    """A run directory holding the SFT and reward-model checkpoints that `rayrlhf ppo --run-dir` starts from."""
    root.mkdir(parents=True)
    shutil.copytree(ckpts.sft, root / "sft" / "checkpoint")
    shutil.copytree(ckpts.rm, root / "rm" / "checkpoint")
    return root


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    with local_cluster(head_cpus=1) as c:
        c.add_node("learner-a", 1, {"learner_node": 1})
        c.add_node("learner-b", 1, {"learner_node": 1})
        c.add_node("rollout", 2, {"rollout_node": 2})
        c.add_node("scorers", 2, {"scorer_node": 2})
        yield c


@pytest.fixture(scope="module")
def one_node(ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path_factory) -> Path:
    """The uninterrupted run on a single-node Ray (no custom resources), as `rayrlhf ppo` runs it."""
    from rayrlhf.pipeline.workflow import ppo
    from rayrlhf.pipeline.run_dir import RunDir

    cfg = make_tiny_cfg(*SIZES)
    run = RunDir.create(cfg, str(_run_dir(tmp_path_factory.mktemp("one") / "run", tiny_checkpoints)))
    ppo(cfg, run)
    return run.path


def _submit(cluster: LocalCluster, run: Path, tiny_overrides: list[str], *extra: str) -> str:
    """`rayrlhf submit --no-wait` of the PPO stage on `run`; the job id."""
    sets = [a for item in [*tiny_overrides, *SIZES, *PLACED, *extra] for a in ("--set", item)]
    argv = ["submit", "--address", cluster.address, "--command", "ppo", "--run-dir", str(run), "--no-wait", *sets]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue().split()[0]


def _wait(cluster: LocalCluster, job_id: str) -> str:
    return wait_terminal(cluster, job_id, JOB_TIMEOUT_S)


def _wait_for_step(cluster: LocalCluster, job_id: str, run: Path, step: int, checkpoint: bool = False) -> None:
    """Until the run has logged `step` (and, with `checkpoint`, written a checkpoint)."""
    metrics, latest = run / "ppo" / "metrics.jsonl", run / "ppo" / "checkpoints" / "latest"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        logged = metrics.is_file() and len(metrics.read_text().splitlines()) >= step
        if logged and (latest.exists() or not checkpoint):
            return
        if cluster.client().get_job_status(job_id).is_terminal():
            pytest.fail(f"job {job_id} ended before step {step}:\n{cluster.client().get_job_logs(job_id)[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not reach step {step}")


def _placement(cluster: LocalCluster, known: set[str]) -> dict[str, list[str]]:
    """Ray's own record of where each PPO role's actors ran (the state API's actors, with their node's name among
    this cluster's nodes), for the actors not in `known`."""
    node_name = {n.node_id: n.name for n in [cluster.head, *cluster.workers]}
    where: dict[str, list[str]] = {}
    for a in cluster.actors():
        role = ROLE_OF_CLASS.get(a["class_name"])
        if role and a["actor_id"] not in known:
            where.setdefault(role, []).append(node_name.get(a["node_id"], a["node_id"]))
    return {role: sorted(nodes) for role, nodes in where.items()}


def _job_ok(cluster: LocalCluster, job_id: str, status: str) -> None:
    assert status == "SUCCEEDED", cluster.client().get_job_logs(job_id)[-4000:]


def test_roles_spread_over_nodes_and_a_lost_learner_node_resumes_by_itself(one_node, cluster, tiny_overrides,
                                                                          tiny_checkpoints, tmp_path):
    """Item 1: the learner group's ranks on two nodes, the rollout workers on a third, the scorers on a fourth;
    weights crossing nodes through the collective transport (gloo between the learner and the rollout workers on
    other nodes) and the object store (experience, the reference's and reward's inputs).
    Item 2(b): then the node of learner rank 0 is killed after the first checkpoint and a new learner node joins
    (as KubeRay replaces a lost pod). The job starts its roles again from the checkpoint, on their own, and ends
    with the uninterrupted one-node run's weights. (One run for both: a cluster run costs CI minutes.)"""
    known = {a["actor_id"] for a in cluster.actors()}
    run = _run_dir(tmp_path / "run", tiny_checkpoints)
    job = _submit(cluster, run, tiny_overrides, "ppo.weight_sync=collective")
    _wait_for_step(cluster, job, run, 1, checkpoint=True)
    placed = _placement(cluster, known)
    print("placement:", placed)
    assert placed == {"learner": ["learner-a", "learner-b"], "rollout": ["rollout", "rollout"],
                      "reference": ["scorers"], "reward": ["scorers"]}

    victim = next(n for n in cluster.workers if n.name == "learner-a")
    killed_at = victim.kill()
    cluster.add_node("learner-c", 1, {"learner_node": 1})
    _job_ok(cluster, job, _wait(cluster, job))

    events = read_metrics(run / "ppo" / "events.jsonl")
    lost = [e for e in events if e["event"] == "learner_lost"]
    resumed = [e for e in events if e["event"] == "resumed" and e["time"] > killed_at]
    assert len(lost) == 1 and lost[0]["nodes"][0].startswith(f"node {victim.node_id[:12]} ("), lost
    assert len(resumed) == 1, events
    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    after = [r for r in rows if r["time"] > resumed[0]["time"]]
    print(f"kill -> learner_lost {lost[0]['time'] - killed_at:.1f} s -> resumed from {resumed[0]['checkpoint']} "
          f"{resumed[0]['time'] - killed_at:.1f} s -> next step logged {after[0]['time'] - killed_at:.1f} s")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    audit = json.loads((run / "ppo" / "ledger.json").read_text())["audit"]
    assert audit["ok"] and audit["consumed"] == 4, audit
    diff = _max_weight_diff(one_node, run)
    print(f"max abs weight diff, 4 nodes with a learner node lost vs 1 node: {diff:g}")
    assert diff == 0.0


@pytest.mark.outside_ci  # CI: Ray's actor restarts and the re-dispatch in test_faults.py, a node kill in the test above
def test_a_lost_rollout_node_costs_nothing(one_node, cluster, tiny_overrides, tiny_checkpoints, tmp_path):
    """Item 2(a): the node holding the rollout workers is killed after step 1. Ray moves their bundles to the
    spare node and restarts them; the driver dispatches the lost shards again; nothing is lost or duplicated."""
    cluster.add_node("spare", 2, {"rollout_node": 2, "scorer_node": 2})
    known = {a["actor_id"] for a in cluster.actors()}
    run = _run_dir(tmp_path / "run", tiny_checkpoints)
    job = _submit(cluster, run, tiny_overrides)
    _wait_for_step(cluster, job, run, 1)
    alive = [a for a in cluster.actors() if a["actor_id"] not in known and a["state"] == "ALIVE"]
    rollout_node = next(a["node_id"] for a in alive if a["class_name"] == "RolloutWorker")
    victim = next(n for n in cluster.workers if n.node_id == rollout_node)
    assert victim.name in ("rollout", "spare")
    assert not any(a["class_name"] == "LearnerWorker" and a["node_id"] == rollout_node for a in alive)
    killed_at = victim.kill()
    _job_ok(cluster, job, _wait(cluster, job))

    audit = json.loads((run / "ppo" / "ledger.json").read_text())["audit"]
    assert audit["ok"] and audit["consumed"] == 4, audit
    events = read_metrics(run / "ppo" / "events.jsonl")
    again = [e for e in events if e["event"].endswith("_redispatched")]
    assert again and len(again) == len(audit["redispatched"]), (again, audit["redispatched"])
    after = [r for r in read_metrics(run / "ppo" / "metrics.jsonl") if r["time"] > killed_at]
    redone = [r for r in after if r["time"] > again[0]["time"]]
    print(f"killed {victim.name}; first re-dispatch {again[0]['time'] - killed_at:.1f} s after the kill, the first "
          f"step logged after it {redone[0]['time'] - killed_at:.1f} s after; re-dispatched calls: {len(again)}")
    assert [r["step"] for r in read_metrics(run / "ppo" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _max_weight_diff(one_node, run) == 0.0
