"""Resumable training state on disk: numbered checkpoint directories, each written aside and then renamed.

    <stage>/checkpoints/step-000040/   one complete checkpoint (what goes in it is the stage's business)
    <stage>/checkpoints/latest         the name of the newest complete one, replaced atomically

A directory is first written as `step-N.tmp` and renamed only once every file in it is written and flushed,
and `latest` moves only after that rename: a crash at any moment leaves the previous checkpoint intact and
named by `latest`. Leftover `.tmp` directories are never read and are removed by the next save.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrlhf.core.files import atomic_write_text
from rayrlhf.core.metrics import MetricsLogger


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


class CheckpointDir:
    """The numbered checkpoints of one stage under `<root>`; keeps the newest `keep` (0 keeps all)."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def save(self, step: int, write: Callable[[Path], None], leader: bool = True,
             barrier: Callable[[], None] = lambda: None) -> Path:
        """`write(tmp_dir)` fills a fresh directory; it then becomes `step-N` and `latest` names it.

        In a group every rank calls it: the leader (rank 0) prepares the directory and publishes it, each rank's
        `write` adds its own files in between, and `barrier` keeps them in step."""
        name = f"step-{step:06d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        if leader:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            tmp.mkdir()
        barrier()
        write(tmp)
        barrier()
        if leader:
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (a resumed run passing it once more)
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", name)
            self._prune()
        barrier()
        return final

    def clear(self) -> None:
        """A fresh (not resumed) run: earlier checkpoints here belong to another run and must never be resumed."""
        shutil.rmtree(self.root, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Trusts `latest`, falling back to the highest `step-N`."""
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        steps = self.complete()
        return steps[-1] if steps else None

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-")
                      and not p.name.endswith(".tmp"))

    def _prune(self) -> None:
        if self.keep:
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)


def trainable_state(model) -> dict | None:
    """The trainable parameters of `model` (copies, on the CPU); None for no model. With LoRA these are the
    adapters (and fully trained heads): a resumable checkpoint needs them, not the frozen base weights."""

    if model is None:
        return None
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, saved: dict, what: str) -> None:
    """Copy what `trainable_state` saved back into `model`; the names must match (same LoRA config)."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(saved):
        raise ValueError(f"{what} checkpoint's trainable parameters do not match this model's "
                         f"(e.g. {sorted(set(params) ^ set(saved))[:3]}); was the LoRA config changed?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


STATE_FORMAT = 2  # of `trainer_state.pt`: 2 = one entry per trained part (`write_state`); 1 (unnamed) = before


class CheckpointFormatError(ValueError):
    """A checkpoint written by another version of rayrlhf's state format: it cannot be resumed."""


@dataclass(frozen=True)
class Trained:
    """A model that trains, with its optimizer and schedule: one part of a resumable checkpoint (`write_state`).
    `hf_folder`: where the caller saved the model's full weights in Hugging Face format, read back from there
    instead of being stored twice."""

    name: str
    model: Any
    opt: Any
    sched: Any
    hf_folder: Path | None = None


def write_state(path: Path, parts: Sequence[Trained], small: dict, group=None) -> None:
    """Everything a trainer needs to go on exactly as if never stopped, into checkpoint directory `path`: each
    part's weights (with LoRA only the trainable ones; none where `hf_folder` holds them), optimizer and
    schedule, with `small` (the step or version, RNG states, the best result) in `trainer_state.pt`.

    In a FSDP group (`group`, a `sharding.TrainGroup` or one with `fsdp`, `leader`, `rank`) each rank writes its
    shards of the models and optimizers with torch.distributed.checkpoint (`sharded/`) and rank 0 the rest,
    with the group's size. The caller makes the directory appear atomically (`CheckpointDir.save`)."""
    import torch

    sharded = group is not None and group.fsdp
    state = {"format": STATE_FORMAT, **small}
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        shards = {}
        for part in parts:
            shards[part.name], shards[f"{part.name}_optimizer"] = get_state_dict(part.model, part.opt)
        dcp.save(shards, checkpoint_id=str(path / "sharded"))
        state["world"] = group.rank.world
    for part in parts:
        entry = {"scheduler": part.sched.state_dict()}
        if not sharded:
            entry["optimizer"] = part.opt.state_dict()
            if any(not p.requires_grad for p in part.model.parameters()):  # LoRA: the frozen base is a checkpoint's
                entry["trainable"] = trainable_state(part.model)
            elif part.hf_folder is None:
                entry["weights"] = part.model.state_dict()
        state[part.name] = entry
    if not sharded or group.leader:
        torch.save(state, path / "trainer_state.pt.tmp")
        (path / "trainer_state.pt.tmp").replace(path / "trainer_state.pt")


def read_state(path: Path, parts: Sequence[Trained], group=None, hint: str = "",
               load_hf: Callable[[Trained], dict] | None = None) -> dict:
    """Restore what `write_state` wrote into `parts` (built as when it was written) and the RNG; returns the
    state's small entries. A sharded checkpoint loads into a group of the size that wrote it (and only there):
    the error names both sizes and `hint`, the keys that set them. `load_hf(part)`: the state dict of a part's
    `hf_folder`."""
    import torch

    file = path / "trainer_state.pt"
    if not file.is_file():
        raise CheckpointFormatError(f"{path} holds no trainer_state.pt (written by an older rayrlhf, or not a "
                                    "checkpoint): start this stage over instead of resuming it")
    state = torch.load(file, map_location="cpu", weights_only=False)
    if state.get("format") != STATE_FORMAT:
        raise CheckpointFormatError(f"{file} has checkpoint format {state.get('format', 1)}; this rayrlhf reads "
                                    f"format {STATE_FORMAT}: start this stage over instead of resuming it")
    world = group.rank.world if group is not None and group.fsdp else None
    if state.get("world") != world:
        wrote = f"a group of {state['world']} ranks" if "world" in state else "one unsharded process"
        this = f"a group of {world} ranks" if world is not None else "one unsharded process"
        raise ValueError(f"{path} was written by {wrote}; this is {this} ({hint})")
    if world is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        shards = {}
        for part in parts:
            shards[part.name], shards[f"{part.name}_optimizer"] = get_state_dict(part.model, part.opt)
        dcp.load(shards, checkpoint_id=str(path / "sharded"))
        for part in parts:
            set_state_dict(part.model, part.opt, model_state_dict=shards[part.name],
                           optim_state_dict=shards[f"{part.name}_optimizer"])
    for part in parts:
        entry = state[part.name]
        if world is None:
            if "trainable" in entry:
                load_trainable_state(part.model, entry["trainable"], f"{path} ({part.name})")
            elif "weights" in entry:
                part.model.load_state_dict(entry["weights"])
            elif load_hf is not None and part.hf_folder is not None:
                part.model.load_state_dict(load_hf(part))
            else:
                raise CheckpointFormatError(f"{file} holds no weights of {part.name} and names no folder that does")
            part.opt.load_state_dict(entry["optimizer"])
        part.sched.load_state_dict(entry["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


_STAGE_HINT = "set the stage's workers and model.mixed_precision as when it was written"


def save_training_state(ckpts: CheckpointDir, step: int, model, opt, sched, best: dict, group=None) -> Path:
    """A resumable SFT/RM checkpoint (`write_state`): the model's current (not best) weights, optimizer,
    scheduler, torch RNG and the best result so far. The data order is a function of (seed, epoch), so `step` is
    the data cursor."""
    import torch

    def write(tmp: Path) -> None:
        write_state(tmp, [Trained("model", model, opt, sched)],
                    {"step": step, "torch_rng": torch.get_rng_state(), "best": best}, group)

    if group is not None and group.fsdp:
        return ckpts.save(step, write, group.leader, group.barrier)
    return ckpts.save(step, write)


def load_training_state(path: Path, model, opt, sched, group=None) -> tuple[int, dict]:
    """Restore what `save_training_state` wrote; returns (step, best)."""
    state = read_state(path, [Trained("model", model, opt, sched)], group, _STAGE_HINT)
    return state["step"], state["best"]


def resume_or_start(ckpts: CheckpointDir, resume: bool, log_dir: Path, model, opt, sched, best: dict,
                    group=None) -> tuple[int, dict]:
    """(step, best) to start a training loop from: the latest checkpoint's when resuming and there is one,
    else (0, best). Metrics rows after that step, written by the run that stopped, are dropped. In a group,
    rank 0 alone clears and truncates; every rank loads."""
    leader = group is None or group.leader
    if not resume and leader:
        ckpts.clear()
    if group is not None:
        group.barrier()
    latest = ckpts.latest() if resume else None
    step = 0
    if latest is not None:
        step, best = load_training_state(latest, model, opt, sched, group)
    if leader:
        MetricsLogger.truncate(log_dir, step)
    return step, best
