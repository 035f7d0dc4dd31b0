"""`rayrlhf` command line: load config, build, run, clean up.

    rayrlhf train [--config F] [--set k=v ...] [--run-dir D]     SFT -> RM -> PPO -> eval -> report
    rayrlhf train --resume D                                      continue run D from its last checkpoint
    rayrlhf sft | rm | judge | ppo | eval  [same options]         one stage (all but eval take --resume D)
    rayrlhf scale --run-dir D --workers N [--address A]          resize a running PPO job's rollout workers
Exit codes: 0 ok, 1 runtime failure, 2 bad config or arguments (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.core.config import Config, ConfigError, load_config
from rayrlhf.core.process import enable_token_auth, quiet_transformers

log = logging.getLogger("rayrlhf")


def _common(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    p.add_argument("--config", help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sft.lr=1e-4 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default: <run.output_dir>/<run.name>-<timestamp>)")
    if resumable:
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue this run from its last checkpoint, with the config.yaml it was started with")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="the full pipeline: SFT -> reward model -> PPO -> evaluation report")
    _common(p, resumable=True)
    p = sub.add_parser("sft", help="supervised fine-tuning")
    _common(p, resumable=True)
    p = sub.add_parser("rm", help="reward model from an SFT checkpoint")
    _common(p, resumable=True)
    p.add_argument("--sft-checkpoint", help="default: <run-dir>/sft/checkpoint")
    p = sub.add_parser("judge", help="judge reward model on the comparisons kept from the reward model "
                                     "(data.judge_fraction), for evaluation")
    _common(p, resumable=True)
    p.add_argument("--sft-checkpoint", help="default: <run-dir>/sft/checkpoint")
    p = sub.add_parser("ppo", help="PPO from SFT and reward-model checkpoints")
    _common(p, resumable=True)
    p.add_argument("--sft-checkpoint", help="default: <run-dir>/sft/checkpoint")
    p.add_argument("--rm-checkpoint", help="default: <run-dir>/rm/checkpoint")
    p = sub.add_parser("eval", help="evaluate SFT and PPO policies of a run and write report.md")
    _common(p)
    p = sub.add_parser("serve", help="serve a reward model over HTTP (Ray Serve + FastAPI)")
    p.add_argument("--config", help="YAML config whose `serve` section applies")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", required=True, help="reward-model checkpoint directory")
    p.add_argument("--host", help="listen address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default serve.port)")
    p = sub.add_parser("submit", help="submit the pipeline to a Ray cluster as a Ray job and follow it")
    _common(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--command", dest="job_command", default="train", choices=["train", "sft", "rm", "ppo"],
                   help="the rayrlhf command the job runs")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run on the cluster's shared storage from its last checkpoint (train/sft/rm/ppo)")
    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p = sub.add_parser("scale", help="add or remove rollout workers of a running PPO job")
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--run-dir", help="the job's run directory (its name identifies the job)")
    run.add_argument("--run", dest="run_name", help="the name of the job's run directory")
    p.add_argument("--workers", type=_positive_int, required=True, help="rollout workers the job should have")
    p.add_argument("--address", help="Ray cluster address, e.g. HEAD:6379 or auto (default: RAY_ADDRESS)")
    p.add_argument("--wait-for-nodes", action="store_true",
                   help="accept more workers than the cluster has free resources for now (an autoscaler adds nodes)")
    return parser


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


@dataclass(frozen=True)
class StageRequest:
    """What a stage command (or `serve`) asked for, resolved once from its arguments: the config to load (a resumed
    run's own), the run directory to create (`run_dir`) or to go on with (`resume_from`), and given checkpoints."""

    command: str
    config: str | None
    overrides: list[str]
    run_dir: Path | None = None
    resume_from: Path | None = None  # the run directory to go on with
    sft_checkpoint: Path | None = None
    rm_checkpoint: Path | None = None


class UsageError(Exception):
    """Arguments that cannot run: one line, exit 2."""


@dataclass
class ResumeHint:
    """How to continue a run that stopped: set once its directory exists (a new run's is named only then)."""

    command: str
    run_dir: Path | None = None

    def __str__(self) -> str:
        if self.command in RESUMABLE and self.run_dir is not None and (self.run_dir / "config.yaml").is_file():
            return f" (continue with `rayrlhf {self.command} --resume {self.run_dir}`)"
        return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hint = ResumeHint(args.command, _path(getattr(args, "resume", None) or getattr(args, "run_dir", None)))
    try:
        return _main(args, hint)
    except KeyboardInterrupt:  # Ctrl-C: one line and how to continue, never a traceback
        print(f"rayrlhf {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _main(args: argparse.Namespace, hint: ResumeHint) -> int:
    enable_token_auth()
    quiet_transformers()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "jobs":
        from rayrlhf.pipeline.jobs import jobs_main

        return jobs_main(args)
    if args.command == "scale":
        return scale_main(args)
    try:
        request = stage_request(args)
        cfg = load_config(request.config, request.overrides, written_by_a_run=request.resume_from is not None)
        cfg, differs = _preflight(request, cfg)
    except (UsageError, ConfigError) as e:
        print(f"rayrlhf: {e}" if isinstance(e, ConfigError) else f"rayrlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve_main(args, cfg)
        if args.command == "submit":
            from rayrlhf.pipeline.jobs import submit_main

            return submit_main(args, cfg)
        return _run(request, cfg, differs, hint)
    except Exception as e:  # noqa: BLE001 - every failure of a run is one line, never a traceback
        line = error_line(e)
        print(f"rayrlhf {args.command}: error: {line}{'' if '--resume' in line else hint}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return 1


def stage_request(args: argparse.Namespace) -> StageRequest:
    """The request a command's arguments make; UsageError for arguments that cannot go together."""
    command, resume_from = args.command, _path(getattr(args, "resume", None))
    if command == "eval" and not args.run_dir:
        raise UsageError("--run-dir is required: eval evaluates the SFT and PPO policies of a run directory "
                         "(e.g. --run-dir runs/rayrlhf-20250101-120000)")
    given = {"sft_checkpoint": _path(getattr(args, "sft_checkpoint", None)),
             "rm_checkpoint": _path(getattr(args, "rm_checkpoint", None))}
    if resume_from is None:
        return StageRequest(command, args.config, args.overrides, _path(getattr(args, "run_dir", None)), **given)
    clash = [flag for flag, value in (("--config", args.config), ("--set", args.overrides), ("--run-dir", args.run_dir),
                                      ("--sft-checkpoint", given["sft_checkpoint"]),
                                      ("--rm-checkpoint", given["rm_checkpoint"])) if value]
    if clash:
        raise UsageError("--resume continues a run with its own config and checkpoints; it cannot be combined with "
                         + ", ".join(clash))
    if command == "submit":  # a submitted job reads the run directory on the cluster's storage
        return StageRequest(command, args.config, args.overrides, resume_from=resume_from)
    if not (resume_from / "config.yaml").is_file():
        raise UsageError(f"--resume {resume_from}: not a run directory (no config.yaml)")
    own = resume_from / command / "config.yaml"  # a stage run with a config of its own (`preflight.run_config`)
    config = own if own.is_file() and command != "train" else resume_from / "config.yaml"
    return StageRequest(command, str(config), [], resume_from, resume_from)


def _preflight(request: StageRequest, cfg: Config) -> tuple[Config, list[str] | None]:
    """A stage's inputs and resources checked before anything starts (UsageError otherwise) -> the config to run
    with (a run directory's own, `preflight.run_config`) and the keys where the given one differs from it."""
    if request.command not in (*STAGE_COMMANDS, "serve"):
        return cfg, None
    from rayrlhf.pipeline.preflight import PreflightError, check_inputs, check_resources, run_config

    differs = None
    try:
        if request.command != "serve" and request.resume_from is None:
            if request.run_dir is not None:
                cfg, differs = run_config(request.run_dir, cfg, bool(request.config or request.overrides),
                                          request.command)
            check_inputs(cfg, request.command, request.run_dir, request.sft_checkpoint, request.rm_checkpoint)
        check_resources(cfg, request.command)
    except PreflightError as e:
        raise UsageError(str(e)) from e
    return cfg, differs


STAGE_COMMANDS = ("train", "sft", "rm", "judge", "ppo", "eval")
RESUMABLE = ("train", "sft", "rm", "judge", "ppo")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(e: BaseException) -> str:
    """One line for a failed run: the cause and, for an error raised inside a Ray actor or task, where.

    Ray wraps an actor's exception in a RayTaskError whose text is the remote traceback (with colour codes);
    its `cause` is the original exception."""
    from ray.exceptions import RayTaskError

    where = ""
    while isinstance(e, RayTaskError) and e.cause is not None and e.cause is not e:
        # what ray.get raises is `as_instanceof_cause()`: a RayTaskError and the cause's type at once, which
        # may lack the function name (its attribute lookups fall through to the cause)
        name = e.__dict__.get("function_name")
        where = where or (f" (in {name})" if name else "")
        e = e.cause
    text = ANSI.sub("", str(e)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(e).__name__
    prefix = "" if isinstance(e, (ValueError, FileNotFoundError, RuntimeError)) else f"{type(e).__name__}: "
    return f"{prefix}{first}{where}"


def scale_main(args: argparse.Namespace) -> int:
    """Ask a running PPO job for `--workers` rollout workers through its `RolloutScaler` actor. One line and
    exit 2 for an address nothing answers at or a count the cluster cannot place; exit 1 when the job refuses."""
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError

    from rayrlhf.core.scaling import SCALER_NAMESPACE, placeable, scaler_name
    from rayrlhf.pipeline.cluster import AddressError, check_address

    def error(message: str, code: int = 1) -> int:
        print(f"rayrlhf scale: error: {message}", file=sys.stderr)
        return code

    run_name = args.run_name or Path(args.run_dir).resolve().name
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if not address:  # a fresh local Ray would hold no job to scale
            return error("give --address (or set RAY_ADDRESS) of the job's Ray cluster", 2)
        try:
            check_address(address)
        except AddressError as e:
            return error(f"{'--address' if args.address else 'RAY_ADDRESS'} {e}", 2)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    name = scaler_name(run_name)
    try:
        scaler = ray.get_actor(name, namespace=SCALER_NAMESPACE)
    except ValueError:
        return error(f"no running PPO job named {run_name!r} on this cluster ({name} not found)")
    try:
        status, per_worker = ray.get([scaler.get_status.remote(), scaler.per_worker.remote()], timeout=30)
        more = args.workers - max(status.desired, status.active + status.starting)
        if more > 0 and not args.wait_for_nodes:
            free = ray.available_resources()
            # workers asked for but not started yet (the driver starts them at its next step) will take room too
            room = max(0, placeable(per_worker, free) - max(0, status.desired - status.active - status.starting))
            if more > room:
                asks = ", ".join(f"{k} {v:g}" for k, v in per_worker.items())
                have = ", ".join(f"{k} {free.get(k, 0.0):g}" for k in per_worker)
                return error(f"the cluster can place {room} more rollout worker(s) now (each asks {asks}; free: "
                             f"{have}): --workers at most {args.workers - more + room}, or --wait-for-nodes on an "
                             "autoscaling cluster", 2)
        before = ray.get(scaler.set_desired.remote(args.workers), timeout=30)
    except RayTaskError as e:
        return error(str(e.cause))
    except GetTimeoutError:
        return error(f"{name} did not answer within 30s")
    print(f"{run_name}: rollout workers {before.desired} -> {args.workers} requested (at step {before.step} the job "
          f"had {before.active} active, {before.starting} starting); applied at the start of its next step, "
          f"see <run>/ppo/events.jsonl")
    return 0


def _run(request: StageRequest, cfg: Config, differs: list[str] | None, hint: ResumeHint) -> int:
    from rayrlhf.pipeline import workflow as stages
    from rayrlhf.pipeline.run_dir import RunDir

    resume = request.resume_from is not None
    run = RunDir(request.resume_from) if resume else stages.open_run(cfg, str(request.run_dir) if request.run_dir else None)
    hint.run_dir = run.path  # a new run's directory, for the resume hint of a failure or Ctrl-C
    if differs:
        kept = run.keep_stage_config(request.command, cfg)
        log.warning("%s runs with a config that differs from the run's config.yaml in %s; kept in %s",
                    request.command, ", ".join(differs), kept)
    try:
        if request.command == "train":
            stages.train(cfg, run, resume)
        elif request.command == "sft":
            stages.sft(cfg, run, resume)
        elif request.command in ("rm", "judge"):
            stages.rm(cfg, run, request.sft_checkpoint, resume, request.command)
        elif request.command == "ppo":
            stages.ppo(cfg, run, request.sft_checkpoint, request.rm_checkpoint, resume)
        elif request.command == "eval":
            stages.evaluate(cfg, run)
    finally:
        stages.shutdown()
    print(f"run directory: {run.path}")
    return 0


def _wait_until_interrupted() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait, so the main thread gets to run the signal handlers
        pass


def _serve_request(args: argparse.Namespace, cfg: Config) -> tuple[str, int, Path, str | None]:
    """(host, port, checkpoint, bearer token or None) of `rayrlhf serve`; UsageError for what cannot serve."""
    from rayrlhf.pipeline.preflight import PreflightError, check_checkpoint
    from rayrlhf.serving.auth import TokenError, is_loopback, resolve_token

    host = args.host or cfg.serve.host
    port = cfg.serve.port if args.port is None else args.port
    checkpoint = Path(args.checkpoint).resolve()
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port")
    try:
        check_checkpoint(checkpoint, "reward-model", "pass a reward model's folder, e.g. <run>/rm/checkpoint", "reward",
                         "--checkpoint")
        token = resolve_token(cfg.serve)
    except (PreflightError, TokenError) as e:
        raise UsageError(str(e)) from e
    if token is None and not is_loopback(host):
        if not cfg.serve.allow_insecure_non_loopback:
            raise UsageError(f"refusing to listen on {host} without a bearer token: set {cfg.serve.token_env} "
                             "(serve.token_env) or serve.token_file, listen on 127.0.0.1, or set "
                             "serve.allow_insecure_non_loopback=true to accept unauthenticated requests from the network")
        log.warning("serving on %s WITHOUT authentication (serve.allow_insecure_non_loopback=true)", host)
    return host, port, checkpoint, token


def serve_main(args: argparse.Namespace, cfg: Config) -> int:
    """`rayrlhf serve --checkpoint DIR [--host H] [--port N]`: serve until interrupted. Exit 2 on bad arguments."""
    import ray
    from ray import serve

    from rayrlhf.pipeline.cluster import connect
    from rayrlhf.serving.proxy import PROXY_CALLBACK
    from rayrlhf.serving.reward_service import APP_NAME, start_service

    try:
        host, port, checkpoint, token = _serve_request(args, cfg)
    except UsageError as e:
        print(f"rayrlhf serve: error: {e}", file=sys.stderr)
        return 2
    own_cluster = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if own_cluster:  # the proxy of a Ray started here inherits this process's environment
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
        # Serve's default 5 s proxy readiness check kills a proxy still starting on a busy laptop (seen in CI)
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    connect(cfg)
    try:
        url = start_service(str(checkpoint), cfg, host, port, require_token=token is not None)
        print(f"reward service: {url} (checkpoint {checkpoint}, auth {'on' if token else 'off'}); "
              f"GET {url}/v1/model for its version, {url}/docs for the API. Ctrl-C stops it.", flush=True)
        _wait_until_interrupted()
    except KeyboardInterrupt:  # Ctrl-C before the service was up (afterwards the handler stops the wait)
        print("rayrlhf serve: interrupted during start-up", file=sys.stderr)
        return 130
    finally:
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
        else:  # someone else's cluster: remove only this application
            serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
