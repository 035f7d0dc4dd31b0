"""SFT and reward-model trainer groups (`sft.workers`, `rm.workers`: FSDP2 over gloo on CPU).

Each invariance test trains the stage in this process (no process group: the plain path) and with a group of two
spawned ranks, from the same config, then compares the saved (plain, full) checkpoints and the logged losses."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from rayrlhf.roles.rm import RMTrainer
from rayrlhf.roles.sft import SFTTrainer
from rayrlhf.core.pairs import pair_scores



def test_workers_must_split_every_batch_and_fit_the_cluster():
    from rayrlhf.core.config import load_config

    with pytest.raises(ValueError, match=r"sft.batch_size \(16\) must be a positive multiple of sft.workers \(3\)"):
        load_config(None, ["sft.batch_size=16", "sft.micro_batch_size=8", "sft.workers=3"])
    with pytest.raises(ValueError, match=r"ray.num_cpus 2 is less than the 4 CPUs"):
        load_config(None, ["ray.num_cpus=2", "rm.workers=2", "rm.num_cpus=2", "ppo.num_cpus=0.5",
                           "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "reference.num_cpus=0.5"])
    assert load_config(None, ["rm.workers=2"]).rm.workers == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_rank(rank: int, world: int, port: int, stage: str, overrides: list[str], out_dir: str, sft: str | None,
                interrupt_at: int | None) -> None:
    """One rank of a stage's group (a spawned process). `interrupt_at`: after the whole run, the checkpoints after
    that step are removed (as if it had been killed there) and the run resumed from it."""
    import shutil

    import torch.distributed as dist

    from conftest import TINY_OVERRIDES
    from rayrlhf.core.checkpoints import CheckpointDir
    from rayrlhf.core.config import load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
        run = (lambda resume: SFTTrainer(cfg, out_dir, resume).run()) if stage == "sft" else \
            (lambda resume: RMTrainer(cfg, out_dir, sft, resume).run())
        run(False)
        if interrupt_at is not None:
            if rank == 0:
                ckpts = CheckpointDir(Path(out_dir) / "checkpoints", 0)
                for later in [p for p in ckpts.complete() if int(p.name.split("-")[1]) > interrupt_at]:
                    shutil.rmtree(later)
                (ckpts.root / "latest").write_text(f"step-{interrupt_at:06d}")
                (Path(out_dir) / "resumed_at_time").write_text(repr(__import__("time").time()))
            dist.barrier()
            run(True)
    finally:
        dist.destroy_process_group()


def _spawn(stage: str, overrides: list[str], out_dir: Path, sft: Path | None = None,
           interrupt_at: int | None = None) -> None:
    import torch.multiprocessing as mp

    os.environ.pop("RAY_ADDRESS", None)
    mp.spawn(_stage_rank, args=(2, _free_port(), stage, overrides, str(out_dir), str(sft) if sft else None,
                                interrupt_at), nprocs=2)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _rows(out_dir: Path, key: str) -> dict[int, float]:
    """step -> `key` of its first row that has it (the validation row, not the final summary's)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    found = {}
    for r in rows:
        if key in r:
            found.setdefault(r["step"], r[key])
    return found


def _lines(out_dir: Path) -> int:
    return len((out_dir / "metrics.jsonl").read_text().splitlines())


def _sharded_state(out_dir: Path) -> dict:
    from rayrlhf.core.checkpoints import CheckpointDir

    latest = CheckpointDir(out_dir / "checkpoints").latest()
    assert (latest / "sharded").is_dir()  # each rank wrote its shards (torch.distributed.checkpoint)
    return torch.load(latest / "trainer_state.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_two_sft_ranks_make_the_one_process_steps(make_tiny_cfg, tmp_path, packed):
    """Six optimizer steps of the tiny SFT (96 examples, batches of 16 of uneven lengths, micro batches of 2 per
    rank, or packed under a token budget with every rank running the busiest rank's passes)."""
    overrides = ["sft.micro_batch_size=2"] + (["sft.max_tokens_per_micro_batch=160"] if packed else [])
    SFTTrainer(make_tiny_cfg(*overrides), tmp_path / "one" / "sft").run()
    _spawn("sft", overrides, tmp_path / "two" / "sft")

    one, two = tmp_path / "one" / "sft", tmp_path / "two" / "sft"
    diff = _max_diff(_weights(two / "checkpoint"), _weights(one / "checkpoint"))
    moved = _rows(one, "sft/grad_norm")
    print(f"\nSFT {'packed' if packed else 'padded'}: N=2 vs N=1 checkpoint max |diff| {diff:.2e} after {len(moved)} steps")
    assert len(moved) == 6 and diff <= 1e-5
    assert _rows(two, "sft/loss") == pytest.approx(_rows(one, "sft/loss"), rel=1e-5)
    assert _rows(two, "sft/grad_norm") == pytest.approx(moved, rel=1e-4)  # the norm of the full gradient
    assert _rows(two, "sft/valid_loss") == pytest.approx(_rows(one, "sft/valid_loss"), rel=1e-5)
    assert _rows(two, "sft/rougeL") == _rows(one, "sft/rougeL")  # greedy summaries, every rank in step
    assert _sharded_state(two)["world"] == 2
    assert _lines(two) == _lines(one)  # rank 0 alone logs
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(two / "checkpoint").get_vocab() == \
        AutoTokenizer.from_pretrained(one / "checkpoint").get_vocab()  # rank 0's, broadcast


@pytest.mark.slow
def test_two_rm_ranks_make_the_one_process_steps_with_lora(make_tiny_cfg, tiny_checkpoints, tmp_path):
    """Six reward-model steps (96 comparisons, batches of 16, micro batches of 2 pairs per rank), LoRA adapters
    and a fully trained score head; the saved model has the adapters merged and the normalising bias."""
    overrides = ["rm.micro_batch_size=2", "model.lora.r=4", "model.lora.alpha=8"]
    RMTrainer(make_tiny_cfg(*overrides), tmp_path / "one" / "rm", tiny_checkpoints.sft).run()
    _spawn("rm", overrides, tmp_path / "two" / "rm", tiny_checkpoints.sft)

    one, two = tmp_path / "one" / "rm", tmp_path / "two" / "rm"
    diff = _max_diff(_weights(two / "checkpoint"), _weights(one / "checkpoint"))
    print(f"\nRM LoRA: N=2 vs N=1 checkpoint max |diff| {diff:.2e}")
    assert diff <= 1e-5
    for key in ("rm/loss", "rm/train_accuracy", "rm/valid_accuracy", "rm/reward_bias"):
        assert _rows(two, key) == pytest.approx(_rows(one, key), rel=1e-5, abs=1e-6), key
    assert _lines(two) == _lines(one)  # rank 0 alone logs
    assert _sharded_state(two)["world"] == 2
    from transformers import AutoModelForSequenceClassification

    scorer = AutoModelForSequenceClassification.from_pretrained(two / "checkpoint")  # plain: merged, no peft
    assert not hasattr(scorer, "peft_config") and scorer.config.reward_bias == pytest.approx(
        json.loads((one / "checkpoint" / "config.json").read_text())["reward_bias"], rel=1e-5)


@pytest.mark.slow
def test_rm_steps_with_each_pairs_shared_start_run_once_equal_both_sides_run_whole(make_tiny_cfg, tiny_checkpoints,
                                                                                   tmp_path, monkeypatch):
    """rm.share_prefix (the post once, both summaries on its cached keys and values) makes the steps, validation
    and normalising bias of running both sides whole: six steps with LoRA, fp32."""
    from rayrlhf.roles import rm as rm_module

    overrides = ["rm.micro_batch_size=4", "model.lora.r=4", "model.lora.alpha=8"]
    calls = {True: 0, False: 0}
    for share in (True, False):
        def counted(*args, _share=share, **kwargs):
            calls[_share] += 1
            return pair_scores(*args, **kwargs)

        monkeypatch.setattr(rm_module, "pair_scores", counted)
        RMTrainer(make_tiny_cfg(*overrides, f"rm.share_prefix={share}"), tmp_path / str(share), tiny_checkpoints.sft).run()
    assert calls[True] > 0 and calls[False] == 0  # the shared path ran, and only where asked
    shared, whole = tmp_path / "True", tmp_path / "False"
    diff = _max_diff(_weights(shared / "checkpoint"), _weights(whole / "checkpoint"))
    print(f"\nRM shared prefix vs whole sides: checkpoint max |diff| {diff:.2e}")
    assert diff <= 1e-5
    for key in ("rm/loss", "rm/train_accuracy", "rm/valid_accuracy", "rm/valid_loss", "rm/reward_bias"):
        assert _rows(shared, key) == pytest.approx(_rows(whole, key), rel=1e-5, abs=1e-6), key
    assert len(_rows(shared, "rm/loss")) == 6


@pytest.mark.slow
def test_a_sharded_sft_run_resumes_from_its_checkpoint_as_if_uninterrupted(make_tiny_cfg, tmp_path):
    """A group of two, checkpointing every 2 steps, 'killed' after step 4 (the later checkpoints removed) and
    resumed: steps 5 and 6 log the losses of an uninterrupted run (one process) and end with its weights."""
    out = tmp_path / "sft"
    overrides = ["sft.eval_every=2", "run.keep_checkpoints=0"]
    _spawn("sft", overrides, out, interrupt_at=4)
    whole = tmp_path / "whole" / "sft"
    SFTTrainer(make_tiny_cfg(*overrides), whole).run()
    assert _rows(out, "sft/loss") == pytest.approx(_rows(whole, "sft/loss"), rel=1e-5)
    assert _max_diff(_weights(out / "checkpoint"), _weights(whole / "checkpoint")) <= 1e-5
    assert _sharded_state(out)["step"] == 6
    # steps 1-4 were not trained again: their rows are the first run's, 5 and 6 the resumed run's
    resumed_at = float((out / "resumed_at_time").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if "sft/loss" in r}  # each step's training row
    assert sorted(times) == list(range(1, 7))
    assert all(times[s] < resumed_at for s in range(1, 5)) and all(times[s] > resumed_at for s in (5, 6))
