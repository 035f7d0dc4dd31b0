"""Real Ray nodes on this machine for tests: a head with its dashboard (token auth) and worker nodes, each a
`ray start --block` from this venv in a process group of its own, so that a node can be killed whole (its raylet,
agents and workers: SIGKILL to the group) as a machine would be lost.

Ray's state is read over the dashboard's HTTP API (the test process keeps no Ray connection of its own: its
xdist worker may hold a local Ray already). Nodes are stopped by signalling their own process groups, never with
`ray stop`, which kills every Ray process of this user on the machine (other engineers' tests included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0


_HANDED_OUT: set[int] = set()  # every port free_ports gave this process: the OS may offer a closed one again


def free_ports(n: int) -> list[int]:
    """`n` ports free now and never handed out before by this process: a node's ports are picked in several calls
    (a head's dashboard and client server, then each process's), and a port closed after one call can come back
    from the next (CI once gave the client server and the object manager the same one)."""
    ports: list[int] = []
    while len(ports) < n:
        socks = [socket.socket() for _ in range(n - len(ports))]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            ports += [p for p in (s.getsockname()[1] for s in socks) if p not in _HANDED_OUT and p not in ports]
        finally:
            for s in socks:
                s.close()
    _HANDED_OUT.update(ports)
    return ports


def _node_ports() -> list[str]:
    """Explicit free ports for one node's processes: the defaults (52365, 10001, ...) collide with other Ray
    instances on this machine."""
    agent_http, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = free_ports(6)
    return [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}"]


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen
    log: Path
    resources: dict[str, float]
    node_id: str | None = None  # Ray's id of the node, once it has joined

    def kill(self) -> float:
        """SIGKILL to the node's whole process group (raylet, agents, workers); the time of the kill."""
        t = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return t

    def stop(self) -> None:
        """SIGTERM makes `ray start --block` stop the processes it started; SIGKILL what is left of its group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@dataclass
class LocalCluster:
    """A head (GCS at `gcs_port`, dashboard at `address`) and the worker nodes added to it."""

    address: str  # dashboard URL, what `--address` takes
    gcs_port: int
    token: str
    temp_dir: Path
    env: dict[str, str]
    head: RayNode | None = None
    workers: list[RayNode] = field(default_factory=list)

    def _start(self, name: str, cmd: list[str]) -> RayNode:
        log = self.temp_dir / f"ray-start-{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.temp_dir,
                                    start_new_session=True)
        return RayNode(name, proc, log, {})

    def start_head(self, num_cpus: int) -> None:
        dash, client_server = free_ports(2)
        self.address = f"http://127.0.0.1:{dash}"
        self.head = self._start("head", [
            str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}", "--include-dashboard=true", f"--ray-client-server-port={client_server}",
            "--disable-usage-stats", *_node_ports()])
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._alive_or_fail(self.head)
            with contextlib.suppress(requests.RequestException):
                if self.get("/api/jobs/", check=False).status_code == 200 and self._joined(set()):
                    self.head.node_id = self._joined(set())
                    return
            time.sleep(1)
        pytest.fail(f"dashboard at {self.address} not up after {START_TIMEOUT_S:.0f} s:\n{self.head.log.read_text()[-3000:]}")

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None) -> RayNode:
        """A worker node with `num_cpus` CPUs and custom `resources`, once the head lists it alive."""
        resources = resources or {}
        before = {n["node_id"] for n in self.nodes()}
        node = self._start(name, [
            str(VENV_BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{self.gcs_port}",
            f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", "--disable-usage-stats",
            *_node_ports()])
        node.resources = resources
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._alive_or_fail(node)
            node.node_id = self._joined(before)
            if node.node_id:
                self.workers.append(node)
                return node
            time.sleep(1)
        pytest.fail(f"node {name} did not join after {START_TIMEOUT_S:.0f} s:\n{node.log.read_text()[-3000:]}")

    def _joined(self, before: set[str]) -> str | None:
        """The id of an alive node not in `before`, if one has joined."""
        return next((n["node_id"] for n in self.nodes() if n["node_id"] not in before and n["state"] == "ALIVE"), None)

    @staticmethod
    def _alive_or_fail(node: RayNode) -> None:
        if node.proc.poll() is not None:
            pytest.fail(f"ray start ({node.name}) exited with {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")

    def get(self, path: str, check: bool = True) -> requests.Response:
        r = requests.get(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        if check:
            r.raise_for_status()
        return r

    def _state(self, kind: str) -> list[dict]:
        """Ray's state API (`ray list nodes|actors`), over the dashboard."""
        body = self.get(f"/api/v0/{kind}?limit=10000&detail=true").json()
        return body["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        return self._state("nodes")

    def actors(self) -> list[dict]:
        return self._state("actors")

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def close(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:
            node.stop()
        for p in psutil.process_iter(["pid", "cmdline"]):  # workers, job drivers in their own sessions
            if p.info["pid"] != os.getpid() and any(str(self.temp_dir) in a for a in (p.info["cmdline"] or [])):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_terminal(cluster: LocalCluster, job_id: str, timeout_s: float) -> str:
    """Until the job ends; its status (the test fails with the job's logs past `timeout_s`)."""
    client = cluster.client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status.value
        time.sleep(1)
    pytest.fail(f"job {job_id} not finished after {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")


@contextlib.contextmanager
def local_cluster(head_cpus: int, **system_env: str):
    """A head node for the duration of the block, with `local_cluster(...).add_node` for workers; `system_env`:
    extra environment for every node (e.g. Ray's RAY_health_check_* settings)."""
    # tests/conftest.py may already have chosen token auth and a token for in-process Ray: use the same.
    token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", token)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("RAY_ADDRESS", raising=False)
    temp_dir = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **system_env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cluster = LocalCluster(address="", gcs_port=free_ports(1)[0], token=token, temp_dir=temp_dir, env=env)
    try:
        cluster.start_head(head_cpus)
        yield cluster
    finally:
        cluster.close()
        mp.undo()
