"""A reward-service replica killed under load: what a `RewardClient` user sees, and how long Serve takes to
replace the replica.

    python bench/bench_replica_kill.py [--replicas 2] [--clients 64] [--seconds 30] [--kill-at 10]

Starts a local Ray and the service on 127.0.0.1 (untrained model of the default config's size, as
bench_reward_service.py builds it), runs --clients threads that each score 8 texts per call with the default
retry budget (3 retries, 0.2 s backoff), kills one replica's actor at --kill-at seconds (ray.kill: a SIGKILL of
its process), and prints calls that succeeded and failed, the failed attempts the client retried by HTTP
status, p50/p99 latency of calls before and after the kill, and when Serve had the full replica count again.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reward_service import build_checkpoint, free_port, load_texts  # noqa: E402

from rayrlhf.core.config import load_config  # noqa: E402
from rayrlhf.core.process import enable_token_auth, quiet_transformers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--kill-at", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.replicas < 1 or args.clients < 1 or not 0 < args.kill_at < args.seconds:
        p.error("--replicas and --clients must be >= 1 and 0 < --kill-at < --seconds")
    enable_token_auth()
    from rayrlhf.serving.proxy import PROXY_CALLBACK

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    import ray
    from ray import serve

    from rayrlhf.serving.client import RewardClient, RewardServiceError
    from rayrlhf.serving.reward_service import APP_NAME, start_service

    quiet_transformers()
    cfg = load_config(None, [f"serve.num_replicas={args.replicas}", "serve.num_cpus=1"])
    token = secrets.token_hex(16)
    os.environ[cfg.serve.token_env] = token  # before Ray starts: the replicas inherit it
    retried: collections.Counter = collections.Counter()

    class Attempts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "failed (" in message:
                retried[message.split("failed (", 1)[1].split(":", 1)[0]] += 1

    logging.getLogger("rayrlhf.serving.client").addHandler(Attempts())
    latencies: dict[str, list[float]] = {"before": [], "after": []}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
        checkpoint = build_checkpoint(cfg, Path(tmp))
        prompts, responses = load_texts(cfg, 64)
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        try:
            url = start_service(str(checkpoint.resolve()), cfg, "127.0.0.1", free_port(), require_token=True)
            stop, killed = threading.Event(), threading.Event()

            def user(i: int) -> None:
                client = RewardClient(url, token, timeout_s=60, max_retries=3)
                k = i
                while not stop.is_set():
                    batch = [(k + j) % len(prompts) for j in range(8)]
                    t0 = time.perf_counter()
                    try:
                        client.score([prompts[b] for b in batch], [responses[b] for b in batch], truncate_responses=True)
                        latencies["after" if killed.is_set() else "before"].append(time.perf_counter() - t0)
                    except RewardServiceError as e:
                        failed.append(str(e)[:200])
                    k += 8

            users = [threading.Thread(target=user, args=(i,)) for i in range(args.clients)]
            for t in users:
                t.start()
            time.sleep(args.kill_at)
            replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"))
            t_kill = time.monotonic()
            ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
            killed.set()
            replaced_s = None
            while time.monotonic() - t_kill < args.seconds - args.kill_at:
                state = serve.status().applications[APP_NAME].deployments["RewardModel"]
                others = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                          if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")} - {replica["name"]}
                if replaced_s is None and len(others) == args.replicas and \
                        state.replica_states.get("RUNNING", 0) == args.replicas:
                    replaced_s = time.monotonic() - t_kill  # a new replica, not the dead one, is running
                time.sleep(0.25)
            stop.set()
            for t in users:
                t.join(timeout=120)
        finally:
            serve.shutdown()
            ray.shutdown()

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[q - 1] * 1000 if len(xs) > 1 else float("nan")

    ok = sum(len(v) for v in latencies.values())
    print(f"\n{args.replicas} replica(s) x 1 CPU, {args.clients} clients x 8 items/call, one replica killed at "
          f"{args.kill_at:.0f}s of {args.seconds:.0f}s, {os.cpu_count()} cores")
    print(f"calls: {ok} succeeded, {len(failed)} failed; failed attempts retried by the client: {dict(retried) or 0}")
    for phase in ("before", "after"):
        print(f"  {phase} the kill: {len(latencies[phase])} calls, p50 {pct(latencies[phase], 50):.0f} ms, "
              f"p99 {pct(latencies[phase], 99):.0f} ms")
    print(f"back to {args.replicas} running replicas: " + (f"{replaced_s:.1f}s after the kill" if replaced_s else
                                                           "not within the run"))
    for e in failed[:3]:
        print(f"  failed: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
