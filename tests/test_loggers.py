"""Weights & Biases beside TensorBoard (run.loggers), offline (WANDB_MODE=offline, set in conftest): what a W&B
run holds is read back from its offline file."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from rayrlhf.core.config import load_config
from rayrlhf.core.metrics import MetricsLogger


def read_wandb_runs(run_dir: Path) -> dict[str, dict]:
    """{W&B run id: {"config": {...}, "history": [{key: value}, ...]}} from the offline runs under run_dir/wandb.

    An offline run file is a LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB blocks of records: CRC32,
    little-endian length, type) of `wandb_internal_pb2.Record` messages; W&B ships the message types, not a reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs: dict[str, dict] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, payload = path.read_bytes(), 7, b""
        run = runs.setdefault(path.stem.removeprefix("run-"), {"config": {}, "history": []})
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
            payload += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = pb.Record()
                record.ParseFromString(payload)
                payload = b""
                which = record.WhichOneof("record_type")
                if which == "history":
                    run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                           for i in record.history.item})
                elif which in ("config", "run"):  # the config comes with the run record, updates after it
                    items = record.config.update if which == "config" else record.run.config.update
                    run["config"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return runs


def test_metrics_reach_wandb_with_the_config(tmp_path):
    pytest.importorskip("wandb")
    cfg = load_config(None, ["run.loggers=[tensorboard,wandb]", "run.wandb_project=tests"])
    stage = tmp_path / "run" / "sft"
    logger = MetricsLogger(stage, cfg=cfg)
    logger.log(1, {"sft/loss": 2.5, "sft/lr": 1e-3})
    logger.log(2, {"sft/loss": 1.5, "sft/lr": float("nan")})  # non-finite: kept in JSONL, not sent
    logger.close()
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    # W&B's service process writes the offline file; under load its last records can land just after finish()
    deadline = time.monotonic() + 15
    while len((runs := read_wandb_runs(tmp_path / "run")).get(f"{run_id}-sft", {}).get("history", [])) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(runs) == [f"{run_id}-sft"]
    history = [{k: v for k, v in row.items() if not k.startswith("_")} for row in runs[f"{run_id}-sft"]["history"]]
    assert history == [{"sft/loss": 2.5, "sft/lr": 1e-3}, {"sft/loss": 1.5}]
    assert runs[f"{run_id}-sft"]["config"]["ppo"]["kl_coef"] == cfg.ppo.kl_coef  # the whole config
    assert (stage / "tensorboard").is_dir() and len((stage / "metrics.jsonl").read_text().splitlines()) == 2


def test_wandb_without_credentials_is_refused_before_anything_starts(monkeypatch, tmp_path):
    from rayrlhf.pipeline.preflight import PreflightError, check_loggers

    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(PreflightError, match="WANDB_API_KEY"):
        check_loggers(load_config(None, ["run.loggers=[wandb]"]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_loggers(load_config(None, ["run.loggers=[wandb]"]))
