"""A reward-service replica killed under load (as by kill -9) costs a `RewardClient` user nothing with two
replicas: the requests it held come back as retryable JSON 503s (not plain 500s), the client retries them on
the other replica, and Serve replaces the dead one. Real Ray Serve on 127.0.0.1; tiny untrained model."""

from __future__ import annotations

import collections
import logging
import os
import secrets
import socket
import threading
import time

import pytest

from rayrlhf.serving.proxy import PROXY_CALLBACK  # neither Ray nor torch: Ray is not imported yet

TOKEN_ENV = "RAYRLHF_TEST_HA_TOKEN"
TOKEN = os.environ.setdefault(TOKEN_ENV, secrets.token_hex(16))  # before Ray starts, as in test_serving.py
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)

# one xdist worker runs every Ray Serve test (pyproject.toml: --dist loadgroup): two Serve instances at once,
# one on each worker's Ray cluster, refused connections
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Attempts(logging.Handler):
    """The client's log of failed attempts (each retried or fatal), by HTTP status."""

    def __init__(self):
        super().__init__()
        self.statuses: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "failed (HTTP " in message:
            self.statuses[int(message.split("failed (HTTP ")[1][:3])] += 1


def test_a_replica_killed_under_load_costs_a_client_with_retries_nothing(ray_local, make_tiny_cfg, tmp_path):
    import ray
    import torch
    from ray import serve

    from rayrlhf.core.data import corpus_text, load_tldr
    from rayrlhf.core.modeling import build_tiny_llama, load_scalar_model, save_checkpoint, train_tokenizer
    from rayrlhf.serving.client import RewardClient, RewardServiceError
    from rayrlhf.serving.reward_service import APP_NAME, start_service

    cfg = make_tiny_cfg("serve.num_replicas=2", "serve.num_cpus=0.5", f"serve.token_env={TOKEN_ENV}")
    tok = train_tokenizer(corpus_text(load_tldr(cfg.data)), cfg.model.vocab_size)
    torch.manual_seed(0)
    sft = save_checkpoint(build_tiny_llama(cfg.model, tok), tok, tmp_path / "sft")
    rm = save_checkpoint(load_scalar_model(str(sft), tok, init_head=True), tok, tmp_path / "rm")
    url = start_service(str(rm), cfg, "127.0.0.1", free_port(), require_token=True)
    data = load_tldr(cfg.data)
    prompts, responses = [e.query for e in data.sft_valid[:4]], [" a short summary"] * 4
    attempts = Attempts()
    logging.getLogger("rayrlhf.serving.client").addHandler(attempts)
    calls: collections.Counter = collections.Counter()
    errors: list[str] = []
    stop = threading.Event()

    def user() -> None:
        client = RewardClient(url, TOKEN, timeout_s=30, max_retries=3)
        while not stop.is_set():
            try:
                client.score(prompts, responses)
                calls["after_kill" if killed.is_set() else "before_kill"] += 1
            except RewardServiceError as e:
                errors.append(str(e))

    killed = threading.Event()
    users = [threading.Thread(target=user) for _ in range(8)]
    try:
        for t in users:
            t.start()
        time.sleep(4)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")]
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed.set()
        time.sleep(8)
    finally:
        stop.set()
        for t in users:
            t.join(timeout=60)
        logging.getLogger("rayrlhf.serving.client").removeHandler(attempts)
        serve.shutdown()
    assert errors == []  # not one failed call
    assert calls["before_kill"] > 0 and calls["after_kill"] > 0
    assert attempts.statuses[500] == 0  # what the proxy answered before: a plain-text 500
    assert set(attempts.statuses) <= {503}, attempts.statuses
