"""Ray jobs: `rayrlhf submit` runs the pipeline on a cluster through its dashboard; `rayrlhf jobs` watches it.

    rayrlhf submit --address http://HEAD:8265 [--config F] [--set k=v ...] [--command train] [--no-wait]
    rayrlhf jobs status|logs|stop JOB_ID --address http://HEAD:8265

The config is validated here, before anything is sent. The job runs

    rayrlhf <command> --config job_config.yaml --set k=v ...

where job_config.yaml is that validated config (overrides already applied; they are repeated in the
entrypoint only so that `ray job list` shows them, and applying them twice changes nothing). The file is the
job's whole runtime_env working_dir: only the config is shipped, not the code, so the cluster's nodes must
have rayrlhf installed (an image built with the package). Data files and checkpoints named in the config are
paths on the cluster. Inside the job Ray sets RAY_ADDRESS for the driver, so `pipeline.cluster.connect`
joins that cluster instead of starting its own.

Token auth (Ray 2.60): the dashboard wants `Authorization: Bearer <token>`. The token is read the way Ray's
own clients read it (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token) and
sent explicitly, so it does not depend on this machine's RAY_AUTH_MODE. Over plain http it crosses the
network in clear text: use https or a port-forward to reach a remote head.

Exit codes: 0 the job SUCCEEDED (or, with --no-wait / `jobs`, the request was done); 1 the job FAILED or was
STOPPED, or the dashboard is unreachable or refuses the token; 2 bad config or arguments; 130 interrupted
while following (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rayrlhf.core.config import Config, config_to_yaml
from rayrlhf.core.metrics import wandb_env

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

JOB_CONFIG_NAME = "job_config.yaml"
PROBE_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 60.0


class DashboardError(RuntimeError):
    """The dashboard cannot be reached, refuses the token or the request; the message names the address."""


def auth_token() -> str | None:
    """Ray's cluster token, in Ray's order of precedence; None if there is none.

    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (unreadable or empty is an error, as in Ray, not a
    fall-back), else ~/.ray/auth_token (https://docs.ray.io/en/master/ray-core/internals/token-authentication.html).
    """
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if named := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(named).read_text().strip()
        except OSError as e:
            raise DashboardError(f"RAY_AUTH_TOKEN_PATH={named}: cannot read the token: {e}") from None
        if not token:
            raise DashboardError(f"RAY_AUTH_TOKEN_PATH={named}: the file is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    return (default.read_text().strip() or None) if default.is_file() else None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """JobSubmissionClient prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its `address` argument;
    --address is required here, so hide those while the client resolves it rather than ignore the flag."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _probe(address: str, headers: dict[str, str]) -> None:
    """GET /api/version with a timeout (the SDK's own requests have none, so a dead host would hang it)."""
    import requests

    url = f"{address}/api/version"
    try:
        r = requests.get(url, headers=headers, timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        raise DashboardError(f"cannot reach the Ray dashboard at {address}: {type(e).__name__}: {e}") from None
    if r.status_code in (401, 403):
        have = "the token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token was rejected" if headers \
            else "no token found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        raise DashboardError(f"the Ray dashboard at {address} refused the request (HTTP {r.status_code}): {have}; "
                             "set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head node)")
    if r.status_code != 200 or "ray_version" not in r.text:
        raise DashboardError(f"{address} does not look like a Ray dashboard: GET /api/version gave HTTP "
                             f"{r.status_code}: {r.text[:200]!r}")


def _bad_address(what: str, address: str) -> bool:
    """Without a scheme the SDK would read HOST:PORT as a GCS address and go looking for a dashboard there."""
    if address.startswith(("http://", "https://")):
        return False
    print(f"rayrlhf {what}: error: --address {address!r}: give the dashboard's URL, e.g. http://HEAD:8265",
          file=sys.stderr)
    return True


def connect_dashboard(address: str) -> JobSubmissionClient:
    """A job client for the dashboard at `address` (http[s]://HOST:PORT), checked reachable and authorised."""
    address = address.rstrip("/")
    headers = auth_headers()
    _probe(address, headers)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_address_env():
            # With an explicit Authorization header the SDK adds none of its own.
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        # Only without a token: the dashboard let the probe in, but this process's RAY_AUTH_MODE=token
        # (set by `rayrlhf` unless the user chose) makes the SDK insist on a token of its own.
        raise DashboardError(f"the Ray dashboard at {address} needs no token, but no token was found here and "
                             "RAY_AUTH_MODE is token: set RAY_AUTH_MODE=disabled for this command") from None


def job_entrypoint(command: str, overrides: list[str], run_dir: str | None, resume_from: str | None = None) -> str:
    if resume_from:  # the run's own config.yaml, on the cluster's shared storage
        return shlex.join(["rayrlhf", command, "--resume", resume_from])
    argv = ["rayrlhf", command, "--config", JOB_CONFIG_NAME]
    for item in overrides:
        argv += ["--set", item]
    if run_dir:
        argv += ["--run-dir", run_dir]
    return shlex.join(argv)


def job_runtime_env(working_dir: Path, cfg: Config) -> dict:
    """The job's runtime env: its config folder, and the environment its processes need from here. With W&B
    logging, the W&B credentials and mode travel with it (the stages log from actors on the cluster's nodes); like
    every runtime env they are shown to users of the cluster's dashboard, which takes the cluster's token."""
    env_vars = {"TOKENIZERS_PARALLELISM": "false", **wandb_env(cfg)}
    if "HF_HUB_OFFLINE" in os.environ:
        env_vars["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return {"working_dir": str(working_dir), "env_vars": env_vars}


def submit_main(args: argparse.Namespace, cfg: Config) -> int:
    """`rayrlhf submit`: send the validated config as a Ray job; follow it unless --no-wait."""
    if _bad_address("submit", args.address):
        return 2
    if not args.run_dir and not getattr(args, "resume", None) and not Path(cfg.run.output_dir).is_absolute():
        print(f"rayrlhf submit: warning: run.output_dir {cfg.run.output_dir!r} is relative; on the cluster it "
              "resolves inside the job's temporary working_dir. Set an absolute path on shared storage.",
              file=sys.stderr)
    try:
        client = connect_dashboard(args.address)
        with tempfile.TemporaryDirectory(prefix="rayrlhf-job-") as tmp:
            (Path(tmp) / JOB_CONFIG_NAME).write_text(config_to_yaml(cfg))
            # submit_job uploads the directory to the cluster before it returns, so `tmp` may go afterwards.
            entrypoint = job_entrypoint(args.job_command, args.overrides, args.run_dir, getattr(args, "resume", None))
            job_id = client.submit_job(entrypoint=entrypoint,
                                       runtime_env=job_runtime_env(Path(tmp), cfg))
    except _dashboard_errors() as e:
        return _fail("submit", args.address, e)
    print(job_id, flush=True)
    if args.no_wait:
        print(f"submitted job {job_id} to {args.address}; its logs: rayrlhf jobs logs {job_id} "
              f"--address {args.address}", file=sys.stderr)
        return 0
    print(f"following job {job_id} on {args.address} (Ctrl-C stops following, not the job)", file=sys.stderr)
    try:
        status = follow_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nrayrlhf submit: stopped following; job {job_id} keeps running. Stop it with: "
              f"rayrlhf jobs stop {job_id} --address {args.address}", file=sys.stderr)
        return 130
    except _dashboard_errors() as e:
        return _fail("submit", args.address, e)
    return _report_final(client, job_id, status)


def follow_job(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Stream the job's logs to stdout until it ends; return its terminal status.

    If the log stream breaks (a dashboard restart, a proxy timeout), the job is not affected: say so and
    keep polling its status instead.
    """
    import aiohttp

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, aiohttp.ClientError) as e:
        print(f"rayrlhf: log stream of job {job_id} ended early ({e}); waiting for its status", file=sys.stderr)
    return wait_for_terminal(client, job_id, timeout_s=None)


def wait_for_terminal(client: JobSubmissionClient, job_id: str, timeout_s: float | None) -> JobStatus:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED, or `timeout_s` passes (then its current status)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(POLL_INTERVAL_S)


def _report_final(client: JobSubmissionClient, job_id: str, status: JobStatus) -> int:
    from ray.job_submission import JobStatus

    message = client.get_job_info(job_id).message or ""
    print(f"job {job_id} {status.value}" + (f": {message}" if message and status != JobStatus.SUCCEEDED else ""),
          file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


def jobs_main(args: argparse.Namespace) -> int:
    """`rayrlhf jobs status|logs|stop ID`: status prints e.g. `RUNNING`; stop waits until the job has ended."""
    if _bad_address(f"jobs {args.action}", args.address):
        return 2
    try:
        client = connect_dashboard(args.address)
        if args.action == "status":
            info = client.get_job_info(args.job_id)
            print(info.status.value)
            if info.message:
                print(info.message, file=sys.stderr)
        elif args.action == "logs":
            sys.stdout.write(client.get_job_logs(args.job_id))
        elif args.action == "stop":
            if not client.stop_job(args.job_id):
                print(f"job {args.job_id} was not running", file=sys.stderr)
            status = wait_for_terminal(client, args.job_id, timeout_s=STOP_TIMEOUT_S)
            print(status.value)
            if not status.is_terminal():
                print(f"rayrlhf jobs stop: job {args.job_id} still {status.value} after {STOP_TIMEOUT_S:.0f} s",
                      file=sys.stderr)
                return 1
    except _dashboard_errors() as e:
        return _fail(f"jobs {args.action}", args.address, e)
    return 0


def _dashboard_errors() -> tuple[type[BaseException], ...]:
    """How talking to the dashboard fails: the SDK raises RuntimeError for an HTTP error (e.g. an unknown job
    id), ConnectionError / requests' errors (OSError) for the network, ray's AuthenticationError for a token."""
    from ray.exceptions import AuthenticationError

    return (DashboardError, RuntimeError, OSError, AuthenticationError)


def _fail(what: str, address: str, e: Exception) -> int:
    """One line on stderr instead of a traceback: a CLI user needs what failed and where, not the stack."""
    msg = str(e) if isinstance(e, DashboardError) else f"{type(e).__name__}: {e}".strip()
    if address not in msg:
        msg = f"{msg} (dashboard {address})"
    print(f"rayrlhf {what}: error: {msg}", file=sys.stderr)
    return 1
