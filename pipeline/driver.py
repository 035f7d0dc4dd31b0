"""The PPO driver: keeps rollout workers, the reference, the reward scorer and the learner busy.

Each step k reads as numbered, timed stages:
  0. scale — a request from `rayrlhf scale` is applied to the rollout pool (elastic rollout);
  1. dispatch — every batch the staleness gate admits goes to the rollout workers (one shard each); its
     reference log-probs and scores are chained on the rollout's ObjectRefs, so scoring of batch k
     overlaps generation of batch k+1 without the driver waiting;
  2. collect — wait for batch k's shards, reading only each call's small info (sizes, timings; the tensors stay
     in the object store);
  3. learn — the learner reads the shards, joins them into one `Experience`, runs PPO on it and becomes
     version k+1;
  4. sync — version k+1 is published to every worker (queued behind any generate in flight);
  5. record — metrics, and a checkpoint every `ppo.checkpoint_every` steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import torch
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from tqdm import tqdm

from rayrlhf.actors import read_batch
from rayrlhf.core.checkpoints import CheckpointDir
from rayrlhf.core.files import atomic_write_text, read_json, write_json
from rayrlhf.core.config import Config, ConfigError, config_from_dict
from rayrlhf.core.data import load_tldr
from rayrlhf.core.experience import EXPERIENCE_ROLES, BatchInfo, Experience, Role, RolloutRequest, ShardRefs
from rayrlhf.core.ledger import ExperienceLedger
from rayrlhf.core.metrics import MetricsLogger
from rayrlhf.core.modeling import load_tokenizer
from rayrlhf.core.text import encode_queries, with_encodable_queries
from rayrlhf.pipeline.calls import RoleTimeout, StageTimer, await_restart, first_line, ray_get
from rayrlhf.pipeline.inflight import ROLES, InFlight, ShardCalls, ShardFailure, await_batch, finished_shards, gather
from rayrlhf.pipeline.launch import (
    LearnerLost, RoleHandles, await_started, close_roles, join_weight_sync_group, launch_roles, launch_rollout_worker,
)
from rayrlhf.pipeline.pool import EventLog, PoolCalls, RolloutPool
from rayrlhf.pipeline.preflight import config_differences
from rayrlhf.pipeline.resources import role_asks
from rayrlhf.pipeline.schedule import PromptSource, StalenessGate

log = logging.getLogger(__name__)

# After a failed call, how long to wait for Ray to declare a learner rank dead: a lost node is declared after its
# health checks fail (Ray's default: about 15 s), while a peer of the dead rank hangs in a collective meanwhile.
LEARNER_DEATH_S = 45.0

Launcher = Callable[[Config, str, str, str], RoleHandles]  # cfg, sft, rm checkpoints, run name -> started roles


@dataclass
class LoopState:
    """Where the loop stands: fresh, or restored from a checkpoint."""

    step: int = 0  # the first step to run
    next_batch: int = 0  # the next batch to dispatch
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: {"sequences": 0, "tokens": 0})  # the whole run's


@dataclass(frozen=True)
class DriverState:
    """`driver_state.json` of a PPO checkpoint: what the driver needs beside the learner's state to continue,
    and the checkpoints the run started from (which `workflow.ppo` reads on resume). One writer, one reader."""

    step: int
    version: int
    next_batch: int
    totals: dict[str, int]
    sft_checkpoint: str
    rm_checkpoint: str
    config: dict  # `_resumable_config` of the run that wrote it
    ledger: dict

    FILE = "driver_state.json"

    @classmethod
    def read(cls, ckpt: Path) -> DriverState:
        return cls(**read_json(Path(ckpt) / cls.FILE))

    def write(self, ckpt: Path) -> None:
        write_json(Path(ckpt) / self.FILE, asdict(self))


@dataclass
class Throughput:
    """This process's share of the loop, for its throughput (a resumed run counts from its restart)."""

    start: float = field(default_factory=time.perf_counter)
    sequences: int = 0
    tokens: int = 0
    learn_s: float = 0.0  # in the learn stage: the rest of the loop the learner idles


@dataclass(frozen=True)
class PendingLoad:
    """A weight load queued on a rollout worker by a sync: the worker, and the ref of its load time."""

    worker: ActorHandle
    seconds: ObjectRef


class PPODriver:
    """Runs one PPO stage. `launcher` starts the roles (tests pass one that replaces a role); `command` is the
    `rayrlhf` command that started the run ("ppo" or "train"), the one whose `--resume` continues it."""

    def __init__(self, cfg: Config, out_dir: Path, sft_checkpoint: Path, rm_checkpoint: Path,
                 launcher: Launcher = launch_roles, command: str = "ppo"):
        self.created = time.perf_counter()
        self.command = command
        self.cfg, self.pc, self.out_dir, self.launcher = cfg, cfg.ppo, Path(out_dir), launcher
        self.sft_checkpoint, self.rm_checkpoint = str(sft_checkpoint), str(rm_checkpoint)
        self.run_name = self.out_dir.resolve().parent.name  # out_dir is <run>/ppo
        self.checkpoints = CheckpointDir(self.out_dir / "checkpoints", cfg.run.keep_checkpoints)
        self.ledger = ExperienceLedger()
        self.gate = StalenessGate(self.pc.max_staleness)
        self.stream = cfg.rollout.inflight_batches == "stream"
        self.stream_counts = {"regenerated": 0, "later": 0}  # streamed: this step's shards regenerated, taken early
        tok = load_tokenizer(self.sft_checkpoint)
        self.pad_id = tok.pad_token_id
        data = with_encodable_queries(tok, load_tldr(cfg.data), cfg.data)
        self.prompts = encode_queries(tok, [e.query for e in data.sft_train], cfg.data.max_prompt_tokens)
        self.prompt_source = PromptSource(self.prompts, self.pc.prompts_per_step, cfg.run.seed)
        self.packets: dict[int, ObjectRef] = {}  # version -> weights packet, for re-dispatch after a restart
        self.sent: dict[ActorHandle, int] = {}  # in-flight rollout: requests sent to each worker (their `seq`)
        self.unordered: set[ActorHandle] = set()  # in-flight workers restarted by Ray: out of the deterministic order
        self.step = 0  # the step being run, for event rows
        self.roles: RoleHandles | None = None  # set by `start`, with the pool and its event log
        self.pool: RolloutPool | None = None
        self.events: EventLog | None = None
        self.started = False

    def _get(self, refs, what: str):
        return ray_get(refs, what, self.pc.sync_timeout_s, self._resume_hint)

    def _resume_hint(self) -> str:
        """Where a failed run stands and the command that continues this stage: `train --resume` would start a
        run begun by `rayrlhf ppo` over from SFT."""
        latest = self.checkpoints.latest()
        where = f"the last checkpoint is {latest}" if latest else "no PPO checkpoint was written yet"
        return f" ({where}; `rayrlhf {self.command} --resume {self.out_dir.parent}` continues the PPO stage)"

    # --- set-up -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every role and wait until each is up; the rollout workers join the weight-sync group."""
        self.roles = self.launcher(self.cfg, self.sft_checkpoint, self.rm_checkpoint, self.run_name)
        self.events = EventLog(self.out_dir)
        self.pool = RolloutPool(list(self.roles.rollouts), lambda i: launch_rollout_worker(self.cfg, self.sft_checkpoint, i),
                                PoolCalls(self._get), self.events, self.pc.sync_timeout_s,
                                role_asks(self.cfg.rollout))
        await_started(self.roles.named(), self.cfg.ray.startup_timeout_s)
        self.roles.learner.rendezvous(self.cfg.ray.startup_timeout_s)
        if self.pc.weight_sync == "collective":
            join_weight_sync_group(self.roles, self.pc.sync_timeout_s)
        self.started = True  # from here a dead learner rank is a loss to go on from, not a failure to start

    def fresh(self) -> LoopState:
        self.checkpoints.clear()
        MetricsLogger.truncate(self.out_dir, 0)
        if self.pc.weight_sync == "object_store":
            self.packets[0] = self.roles.learner.packet()
        return LoopState()

    def restore(self, ckpt: Path) -> LoopState:
        """Restore the learner, the ledger and the buffered batches from `ckpt`; give the workers its weights."""
        state = DriverState.read(ckpt)
        diff = config_differences(_saved_config(state.config), _resumable_config(self.cfg))
        if diff:
            # Not a command to resume with: `--resume` is what failed. Only a run directory from before attempts
            # recorded their config (`RunDir.start_attempt`), or one edited by hand, gets here.
            raise ValueError(f"{ckpt} was written with a different config ({', '.join(diff)}), so `--resume` cannot "
                             f"continue it; start PPO over with `rayrlhf ppo --run-dir {self.out_dir.parent}`")
        version = self._get(self.roles.learner.load(str(ckpt)), f"learner restoring {ckpt}")[0]
        if version != state.version:
            raise RuntimeError(f"{ckpt}: learner state holds v{version}, driver state v{state.version}")
        self.ledger = ExperienceLedger.from_json(state.ledger)
        try:
            buffered: dict[int, Experience] = torch.load(ckpt / "buffer.pt", weights_only=False)
        except ModuleNotFoundError as e:  # pickled by rayrlhf before its modules moved under `rayrlhf.`
            raise RuntimeError(f"{ckpt / 'buffer.pt'} was written by an older rayrlhf ({e}); this checkpoint cannot "
                               f"be resumed: start PPO over with `rayrlhf ppo --run-dir {self.out_dir.parent}`") from e
        for b in buffered:
            self.ledger.mark_restored(b)
        self.packets[version] = self.roles.learner.packet()
        self.pool.load_verified(self.pool.active, self.packets[version], version, f"the weights of {ckpt}")
        MetricsLogger.truncate(self.out_dir, state.step)
        self.gate.publish(state.step)
        self.events.write(state.step, "resumed", -1, checkpoint=str(ckpt), version=version, buffered=sorted(buffered))
        log.info("resumed PPO from %s: step %d, version %d, buffered batches %s", ckpt, state.step, version,
                 sorted(buffered))
        in_flight = {b: InFlight(b, exp.policy_version, [], experience=exp, info=BatchInfo.of_experience(exp))
                     for b, exp in buffered.items()}
        if self.stream:  # the shards dispatched but not trained, generated again with the version resumed
            in_flight = {b: self.dispatch(b, version, only) for b, only in self.ledger.unconsumed_shards().items()}
        return LoopState(state.step, state.next_batch, in_flight, state.totals)

    # --- loop -------------------------------------------------------------------------------------

    def run(self, resume_from: Path | None = None) -> dict[str, float]:
        """The PPO loop; with `resume` (a checkpoint directory), from where that checkpoint left off."""
        try:
            return self._run(resume_from)
        except Exception as e:
            # A dead learner rank (its node lost, its process killed) fails the call, or its peers' collectives:
            # name the rank and its node. `workflow.ppo` may start the run again from its last checkpoint.
            lost = self.roles.learner.lost(e, LEARNER_DEATH_S) if self.started else None
            if lost is None:
                raise
            if self.events is not None:
                self.events.write(self.step, "learner_lost", -1, nodes=lost.nodes, error=first_line(e),
                                  checkpoint=str(self.checkpoints.latest() or ""))
            raise LearnerLost(f"{lost}{self._resume_hint()}", lost.nodes) from e

    def _run(self, resume_from: Path | None) -> dict[str, float]:
        self.start()
        state = self.restore(resume_from) if resume_from is not None else self.fresh()
        setup_s = time.perf_counter() - self.created
        metrics_log = MetricsLogger(self.out_dir, cfg=self.cfg)
        bar = tqdm(total=self.pc.steps, initial=state.step, desc="ppo", mininterval=2, ascii=True)
        pending: list[PendingLoad] = []
        done = Throughput()
        last: dict[str, float] = {}
        try:  # closed however the attempt ends: a restarted run's next attempt logs to the same files
            for step in range(state.step, self.pc.steps):
                last, pending = self.run_step(step, state, pending, done)
                metrics_log.log(step + 1, last)  # 5. record
                bar.update(1)
                bar.set_postfix(score=f"{last['reward/score_mean']:.3f}", kl=f"{last['ppo/kl']:.2f}",
                                workers=int(last["rollout/num_workers"]))
                if self.pc.checkpoint_every and (step + 1) % self.pc.checkpoint_every == 0 and step + 1 < self.pc.steps:
                    self.checkpoint(step + 1, state)
            summary = self.finish(pending, done)
        finally:
            bar.close()
            metrics_log.close()
        return {"ppo/final_score_mean": last.get("reward/score_mean", float("nan")),
                "ppo/final_kl": last.get("ppo/kl", float("nan")), "ppo/steps": float(self.pc.steps),
                "ppo/resumed_at_step": float(state.step), **summary, "timing/ppo_setup_s": setup_s}

    def run_step(self, step: int, state: LoopState, pending: list[PendingLoad],
                 done: Throughput) -> tuple[dict[str, float], list[PendingLoad]]:
        """Stages 0-4 of step `step`; returns its metrics and the weight loads still queued."""
        self.step = step
        timer = StageTimer()
        with timer.stage("scale"):  # 0. scale
            self.scale(step, self.gate.version, state.next_batch, min([step, *state.in_flight]))
        num_workers = len(self.pool.active)
        with timer.stage("dispatch"):  # 1. dispatch
            while state.next_batch < self.pc.steps and self.gate.admits(state.next_batch):
                state.in_flight[state.next_batch] = self.dispatch(state.next_batch, self.gate.version)
                state.next_batch += 1
        with timer.stage("wait_rollout"):  # 2. collect: the learner idles meanwhile
            flight = self.take(step, state) if self.stream else state.in_flight.pop(step)
            info = self.collect(flight)
            sync_times = self.await_sync(pending)
        t_learn = time.perf_counter()
        with timer.stage("learn"):  # 3. learn
            metrics = self.learn(flight)
        done.learn_s += time.perf_counter() - t_learn
        with timer.stage("sync"):  # 4. sync
            pending = self.sync(step + 1)
            self.gate.publish(step + 1)
            if self.gate.synchronous:  # nothing else can run meanwhile; wait so the time is attributed
                sync_times, pending = self.await_sync(pending), []
        tokens, t = info.response_tokens, info.timings
        scored = tokens + info.prompt_tokens
        state.totals["sequences"] += info.sequences
        state.totals["tokens"] += tokens
        done.sequences += info.sequences
        done.tokens += tokens
        roles = {f"timing/{role}_s": t[f"{role}_s"] for role in EXPERIENCE_ROLES}
        roles.update({f"perf/{role}_mfu": t[f"{role}_mfu"] for role in EXPERIENCE_ROLES if f"{role}_mfu" in t})
        # the generator's tokens are the responses; the scoring roles run prompt and response
        roles.update({f"perf/{role}_tokens_per_s": _per_s(tokens if role == Role.ROLLOUT else scored, t[f"{role}_s"])
                      for role in EXPERIENCE_ROLES})
        return {**metrics, **timer.metrics(), **roles, "timing/worker_load_s": max(sync_times, default=0.0),
                # the vLLM engine's log-probs against the weights it was sent, on the probe of this batch's load
                **({"rollout/engine_probe_diff": t["engine_probe_diff"]} if "engine_probe_diff" in t else {}),
                "rollout/policy_version": float(info.policy_version), "rollout/num_workers": float(num_workers),
                "rollout/workers_starting": float(len(self.pool.starting)),
                "rollout/sequences": float(info.sequences),
                # streamed: shards generated again for stale tokens, and shards of later batches this step took
                **({"rollout/regenerated_shards": float(self.stream_counts["regenerated"]),
                    "rollout/shards_from_later_batches": float(self.stream_counts["later"])} if self.stream else {}),
                "rollout/sequences_per_s": done.sequences / (time.perf_counter() - done.start)}, pending

    def finish(self, pending: list[PendingLoad], done: Throughput) -> dict[str, float]:
        """After the last step: loads and retiring workers finished, final weights saved, the ledger audited."""
        self.await_sync(pending)
        loop_s = time.perf_counter() - done.start
        busy = self._get([w.busy_seconds.remote() for w in self.pool.handles()], "rollout workers' busy seconds")
        self.pool.finish(self.pc.steps)
        self._get(self.roles.learner.save(str(self.out_dir)), "learner checkpoint")
        audit = self.ledger.audit(self.pc.steps, self.prompt_source.batch)
        atomic_write_text(self.out_dir / "ledger.json", json.dumps(
            {"audit": {**asdict(audit), "ok": audit.ok}, "batches": self.ledger.to_json()}, indent=1))
        if not audit.ok:
            raise RuntimeError(f"experience ledger audit failed: lost {audit.lost}, mismatched {audit.mismatched}, "
                               f"duplicate prompts {audit.duplicate_prompts} (see {self.out_dir / 'ledger.json'})")
        return {"ppo/sequences_per_s": done.sequences / loop_s, "ppo/tokens_per_s": done.tokens / loop_s,
                "ledger/consumed_batches": float(audit.consumed),
                "ledger/redispatched_shards": float(len(audit.redispatched)),
                "ledger/regenerated_shards": float(len(audit.regenerated)),
                "ledger/restored_batches": float(len(audit.restored)), "timing/ppo_loop_s": loop_s,
                # the learner outside its updates, and the rollout workers outside generation (and in-flight loads),
                # as shares of this process's loop (a worker's busy seconds count from its start)
                "ppo/learner_idle_fraction": max(0.0, 1 - done.learn_s / loop_s),
                "rollout/idle_fraction": max(0.0, 1 - sum(busy) / len(busy) / loop_s) if busy else float("nan")}

    # --- stages -----------------------------------------------------------------------------------

    def scale(self, step: int, version: int, next_batch: int, collected_before: int | None = None) -> None:
        """Stage 0: bring the rollout pool to the worker count asked for with `rayrlhf scale`."""
        scaler = self.roles.scaler
        desired = self._get(scaler.get_desired.remote(), "rollout scaler")
        failed = self.pool.reconcile(desired, step, version, next_batch, self.roles.learner, collected_before)
        have = len(self.pool.active) + len(self.pool.starting)
        if failed:  # not retried: a worker that cannot start would likely fail again every step
            log.error("%d new rollout worker(s) failed to start; the requested count goes from %d to %d",
                      failed, desired, have)
            self._get(scaler.set_desired.remote(have), "rollout scaler")
        scaler.report.remote(len(self.pool.active), len(self.pool.starting), step + 1)

    def dispatch(self, batch_id: int, version: int, only: list[int] | None = None) -> InFlight:
        """Stage 1: shard batch `batch_id` over the workers; chain reference and reward on each shard. In-flight
        (`rollout.inflight`), shards of `rollout.inflight_shard_prompts` prompts with all their samples, round robin
        over the workers: each scored as soon as its samples are done, a prompt's group whole. `only`: just those
        shards, generated again (a resumed streamed run, whose shards in flight were not saved)."""
        n = self.pc.samples_per_prompt
        indices = self.prompt_source.batch(batch_id)
        workers = self.pool.handles()
        if self.cfg.rollout.inflight:
            k = self.cfg.rollout.inflight_shard_prompts
            starts = range(0, len(indices), k)  # round robin continued from batch to batch: every worker gets work
            shards = [(workers[(batch_id * len(starts) + c) % len(workers)], indices[start : start + k])
                      for c, start in enumerate(starts)]
        else:
            shards = [(worker, indices[w :: len(workers)]) for w, worker in enumerate(workers)]
        flight = InFlight(batch_id, version, [])
        references, rewards = self.roles.references, self.roles.rewards
        for s, (worker, mine) in enumerate(shards):
            if only is not None and s not in only:
                continue
            rep = [i for i in mine for _ in range(n)]  # the n samples of a prompt stay adjacent
            # a seed per shard (in-flight, per prompt group: more shards than 1009, so a wider stride)
            stride = 1_000_003 if self.cfg.rollout.inflight else 1009
            req = RolloutRequest(batch_id=batch_id, shard=s, prompt_indices=rep, prompts=[self.prompts[i] for i in rep],
                                 seed=self.cfg.run.seed * 1_000_003 + batch_id * stride + s, version=version,
                                 **self._inflight_order(worker, batch_id, version))
            # Round robin over the shards of all batches: a batch's shards go to different replicas, and with
            # a single rollout worker successive batches (in flight together when asynchronous) do.
            turn = batch_id * len(shards) + s
            shard = ShardCalls(request=req, worker=worker, reference_actor=references[turn % len(references)],
                               reward_actor=rewards[turn % len(rewards)])
            for role in ROLES:  # in chain order: scoring reads the rollout's result
                shard.dispatch(role)
            flight.shards.append(shard)
        if only is None:
            self.ledger.dispatched(batch_id, indices, version, [self.pool.index_of(h) for h, _ in shards])
        else:
            for shard in flight.shards:
                self.ledger.regenerated(batch_id, shard.request.shard, self.pool.index_of(shard.worker),
                                        "in flight at the checkpoint resumed from")
        return flight

    def _inflight_order(self, worker: ActorHandle, batch_id: int, version: int) -> dict:
        """In-flight rollout: the request's place in its worker's order and, deterministic, the decode step at which
        it moves to the next version (which exists before the batch is consumed only if version < batch_id)."""
        if not self.cfg.rollout.inflight:
            return {}
        if worker in self.unordered:
            return {"seq": None, "switch": None}
        seq = self.sent.get(worker, 0)
        self.sent[worker] = seq + 1
        rc = self.cfg.rollout
        switch = (rc.inflight_switch_step, version + 1) if rc.inflight_deterministic and version < batch_id else None
        return {"seq": seq, "switch": switch}

    def collect(self, flight: InFlight) -> BatchInfo:
        """Stage 2: wait for every shard of the batch, dispatching again the work of actors that died; read the
        calls' infos (the tensors stay in the object store for the learner).

        Exactly once: a shard is dispatched again only when its call failed because its actor died (or came back
        restarted without the batch's weights), to the restarted actor, with the same request and seed and the
        weights of the batch's version; the ledger records every attempt. Other failures end the run.
        """
        if flight.info is not None:  # collected already (at a checkpoint), or restored from one
            return flight.info
        for _ in range(4 * (self.pc.max_actor_restarts + 1)):  # every retry needs a restart; restarts are bounded
            await_batch(flight, self.pc.sync_timeout_s, self.pool.index_of)
            results, failed = gather(flight)
            if not failed:
                break
            self._redispatch(flight, failed)
        else:
            raise RuntimeError(f"batch {flight.batch_id} kept failing after {self.pc.max_actor_restarts} restarts")
        self.pool.note_collected(results.rollouts)
        flight.info = BatchInfo.of_calls(results.rollouts, results.references, results.rewards)
        self.ledger.collected(flight.batch_id, len(flight.shards), flight.info.token_versions)
        return flight.info

    def take(self, step: int, state: LoopState) -> InFlight:
        """Stage 2, streamed (`rollout.inflight_batches stream`): the first shards to be scored, oldest batch first
        among those ready, until the step has ppo.prompts_per_step prompts; the others stay in flight for later
        steps. A shard whose actor died goes again (`_settle`); one with tokens past the staleness bound may go
        again under the current version (`_regenerate`). Exactly once: a shard leaves `state.in_flight` when
        taken, and the ledger refuses a shard consumed twice. Each wait is bounded by ppo.sync_timeout_s from the
        step's last progress."""
        need = self.pc.prompts_per_step // self.cfg.rollout.inflight_shard_prompts
        taken: list[ShardCalls] = []
        self.stream_counts = {"regenerated": 0, "later": 0}
        while len(taken) < need:
            finished, running = finished_shards([fl for _, fl in sorted(state.in_flight.items())])
            if self._settle(finished):  # some went again: look again
                continue
            for fl, sh in finished[: need - len(taken)]:
                if not self._regenerate(fl, sh):
                    fl.shards.remove(sh)
                    taken.append(sh)
            if len(taken) < need and not finished:
                if not running:  # the gate keeps a step's shards dispatched: a bug if not
                    raise RuntimeError(f"step {step}: {len(taken)} of its {need} shards taken and none in flight")
                if not ray.wait(running, timeout=self.pc.sync_timeout_s)[0]:
                    raise RoleTimeout(f"step {step}: {len(taken)} of its {need} shards scored", self.pc.sync_timeout_s)
        for b in [b for b, fl in state.in_flight.items() if not fl.shards]:
            del state.in_flight[b]
        rollouts, references, rewards = (list(x) for x in zip(*(sh.infos for sh in taken)))
        self.pool.note_collected(rollouts)
        self.stream_counts["later"] = sum(r.batch_id > step for r in rollouts)
        info = dataclasses.replace(BatchInfo.of_calls(rollouts, references, rewards), batch_id=step)
        return InFlight(step, info.policy_version, taken, info=info, taken=rollouts)

    def _settle(self, finished: list[tuple[InFlight, ShardCalls]]) -> bool:
        """Streamed: read the infos of the finished shards not read yet, dispatching again those whose calls
        failed (their actor died); True if any went again."""
        failed_any = False
        for fl, sh in finished:
            if sh.infos is not None:
                continue
            results, failed = gather(InFlight(fl.batch_id, fl.version, [sh]))
            if not failed:
                sh.infos = (results.rollouts[0], results.references[0], results.rewards[0])
                continue
            sh.failures += 1  # every retry needs a restart, and restarts are bounded: as `collect`
            if sh.failures > 4 * (self.pc.max_actor_restarts + 1):
                raise RuntimeError(f"batch {fl.batch_id} shard {sh.request.shard} kept failing after "
                                   f"{self.pc.max_actor_restarts} restarts")
            self._redispatch(fl, failed)
            failed_any = True
        return failed_any

    def _regenerate(self, flight: InFlight, shard: ShardCalls) -> bool:
        """A shard with tokens older than the staleness bound at this step's learner version is generated again
        under the current version instead of being trained (`StalenessGate.goes_again`: always when it has no token
        within the bound, once with ppo.stale_tokens regenerate). True if it went again."""
        versions = shard.infos[0].token_versions or {shard.infos[0].policy_version: 1}
        if not self.gate.goes_again(versions, self.pc.stale_tokens, shard.regenerated):
            return False
        oldest = min(versions)
        if shard.worker not in self.pool.handles():  # retired since: the shard goes to a worker still in the pool
            shard.worker = self.pool.handles()[shard.request.shard % len(self.pool.handles())]
        index = self.pool.index_of(shard.worker)
        attempt = self.ledger.regenerated(flight.batch_id, shard.request.shard, index,
                                          f"tokens of v{oldest} past ppo.max_staleness at v{self.gate.version}")
        shard.request = dataclasses.replace(shard.request, version=self.gate.version, seq=None, switch=None)
        shard.regenerated = True
        for role in ROLES:
            shard.dispatch(role)
        self.stream_counts["regenerated"] += 1
        self.events.write(self.step, "shard_regenerated", index, batch=flight.batch_id, shard=shard.request.shard,
                          attempt=attempt, oldest_version=oldest, version=self.gate.version)
        return True

    def _redispatch(self, flight: InFlight, failed: dict[int, ShardFailure]) -> None:
        """Dispatch again the failed calls of `flight`, once each, after their actor has restarted."""
        restarted = set()
        for sid, f in sorted(failed.items()):
            shard = next(sh for sh in flight.shards if sh.request.shard == sid)
            if f.role == Role.ROLLOUT:
                index = self.pool.index_of(shard.worker)
                self._await_restart(shard.worker, f"rollout worker {index}")
                attempt = self.ledger.redispatched(flight.batch_id, sid, index, f.error)
                if self.cfg.rollout.inflight:
                    # The restarted worker's decode loop has lost its place in the order: its requests run on
                    # arrival from now on (seq None, no switch; not repeatable), under the current version, which
                    # it is sent below (a request takes any version at or above its own: not the batch's first).
                    shard.request = dataclasses.replace(shard.request, seq=None, switch=None)
                    if shard.worker not in self.unordered:  # its places after this one will never come
                        self.unordered.add(shard.worker)
                        shard.worker.leave_order.remote()
                        self.events.write(self.step, "worker_unordered", index, batch=flight.batch_id, shard=sid)
                else:  # the restarted actor holds the SFT weights: the batch's version first, then the current one
                    shard.worker.load_weights.remote(self.packets[flight.version])
                shard.dispatch(Role.ROLLOUT)
                restarted.add(shard.worker)
                self.events.write(self.step, "shard_redispatched", index, batch=flight.batch_id, shard=sid,
                                  attempt=attempt, version=flight.version, error=f.error)
            else:
                actor = shard.reference_actor if f.role == Role.REFERENCE else shard.reward_actor
                self._await_restart(actor, self.roles.name_of(actor))
                self.ledger.recalled(flight.batch_id, sid, f.role, f.error)
                self.events.write(self.step, f"{f.role}_redispatched", -1, batch=flight.batch_id, shard=sid, error=f.error)
            if f.role in (Role.ROLLOUT, Role.REFERENCE):
                shard.dispatch(Role.REFERENCE)
            if f.role in (Role.ROLLOUT, Role.REWARD):
                shard.dispatch(Role.REWARD)
        for handle in restarted:
            handle.load_weights.remote(self.packets[self.gate.version])

    def _await_restart(self, actor: ActorHandle, what: str) -> None:
        await_restart(actor, what, self.pc.sync_timeout_s, self.pc.max_actor_restarts, self._resume_hint())

    def learn(self, flight: InFlight) -> dict[str, float]:
        """Stage 3: one PPO update on the learner, which reads the batch's shards from the object store (a batch
        restored from a checkpoint goes joined). A NaN/inf stops the run before anything is saved."""
        batch: Experience | ShardRefs = (flight.experience if flight.experience is not None
                                         else flight.results(self.pad_id))
        try:
            metrics = self._get(self.roles.learner.train_step(batch),
                                f"learner update on batch {flight.batch_id}")[0]
        except FloatingPointError as e:  # raised in the learner; Ray's error is also an instance of it
            raise RuntimeError(f"PPO step {flight.batch_id + 1} stopped: {getattr(e, 'cause', e)}"
                               f"{self._resume_hint()}") from e
        for r in flight.taken or []:
            self.ledger.consumed_shard(r.batch_id, r.shard, self.gate.version, r.token_versions, list(r.prompt_indices))
        if not flight.streamed:
            self.ledger.consumed(flight.batch_id, learner_version=self.gate.version)
        return metrics

    def sync(self, version: int) -> list[PendingLoad]:
        """Stage 4: publish `version` to all workers; returns the loads queued on them."""
        learner = self.roles.learner
        if self.pc.weight_sync == "collective":
            sent = learner.broadcast_weights()  # every rank of a group gathers; rank 0 broadcasts
            loads = [PendingLoad(w, w.receive_weights.remote(version)) for w in self.pool.handles()]
            got = self._get(sent, "learner weight broadcast")[0]
            if got != version:
                raise RuntimeError(f"learner broadcast version {got}, driver expected {version}")
            return loads
        self.packets[version] = packet = learner.packet()  # one object, read by every worker
        for old in [v for v in self.packets if v < self.gate.oldest_usable(version)]:
            del self.packets[old]  # no batch can need it any more
        # deterministic in-flight: a worker applies it on its own only once the requests sent before it are done
        after = self.cfg.rollout.inflight and self.cfg.rollout.inflight_deterministic
        return [PendingLoad(w, w.load_weights.remote(packet, False, self.sent.get(w, 0)
                                                     if after and w not in self.unordered else None))
                for w in self.pool.handles()]

    def await_sync(self, pending: list[PendingLoad]) -> list[float]:
        """Wait for a sync's loads: one wait and one `ray.get` for all workers. A worker that died meanwhile is
        restarted by Ray with the SFT weights: it gets the current version again (a batch of an older version
        reloads that one, see `collect`); only then are the loads read one by one, to find it."""
        if not pending:
            return []
        seconds = [load.seconds for load in pending]  # each load's result: its seconds
        _, late = ray.wait(seconds, num_returns=len(seconds), timeout=self.pc.sync_timeout_s)
        if late:
            names = ", ".join(str(self.pool.index_of(load.worker)) for load in pending if load.seconds in late)
            raise RoleTimeout(f"weight sync to rollout worker(s) {names}", self.pc.sync_timeout_s)
        try:
            return ray.get(seconds)
        except RayActorError:
            pass
        times = []
        for load in pending:
            w, index = load.worker, self.pool.index_of(load.worker)
            try:
                times.append(ray.get(load.seconds))
            except RayActorError:
                if self.pc.weight_sync == "collective":  # such workers are not restarted
                    raise RuntimeError(f"rollout worker {index} died during a collective weight sync"
                                       f"{self._resume_hint()}") from None
                self._await_restart(w, f"rollout worker {index}")
                if self.cfg.rollout.inflight:
                    self.unordered.add(w)
                times.append(self._get(w.load_weights.remote(self.packets[self.gate.version]),
                                       f"weight sync to restarted rollout worker {index}"))
                self.events.write(self.step, "worker_restarted", index, version=self.gate.version)
        return times

    def checkpoint(self, step: int, state: LoopState) -> Path:
        """Stage 5: a resumable checkpoint after `step` steps. Batches already dispatched are collected first and
        saved with it: a resumed run trains on exactly the experience this one would have (nothing dropped,
        nothing generated twice)."""
        buffered = {}
        # streamed: shards in flight are not saved; a resumed run generates them again (`restore`)
        for b, fl in [] if self.stream else sorted(state.in_flight.items()):
            self.collect(fl)
            if fl.experience is None:  # read here once: a checkpoint saves the batch itself
                fl.experience = read_batch(fl.results(self.pad_id))
            buffered[b] = fl.experience

        def write(tmp: Path) -> None:
            self._get(self.roles.learner.save(str(tmp)), "learner checkpoint")
            torch.save(buffered, tmp / "buffer.pt")
            DriverState(step=step, version=self.gate.version, next_batch=state.next_batch, totals=state.totals,
                        sft_checkpoint=self.sft_checkpoint, rm_checkpoint=self.rm_checkpoint,
                        config=_resumable_config(self.cfg), ledger=self.ledger.to_json()).write(tmp)

        return self.checkpoints.save(step, write)

    def close(self) -> None:
        if self.roles is not None:
            close_roles(self.roles, self.pool.all_handles() if self.pool is not None else [])
        if self.events is not None:
            self.events.close()


def _per_s(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def _resumable_config(cfg: Config) -> dict:
    """The parts of the config a resumed run must share with the checkpoint: not where Ray runs the roles (`ray`,
    `<role>.resources`) nor how often a lost learner is replaced."""
    dump = cfg.model_dump(mode="json")
    dump.pop("ray", None)
    dump.get("run", {}).pop("output_dir", None)
    dump.get("ppo", {}).pop("max_learner_restarts", None)
    for section in dump.values():
        if isinstance(section, dict):
            section.pop("resources", None)
    return dump


def _saved_config(saved: dict) -> dict:
    """A checkpoint's config with the defaults of keys added since it was written (validated again), so that a
    key it could not know is no difference; as written where it no longer validates."""
    try:
        return _resumable_config(config_from_dict(copy.deepcopy(saved)))
    except ConfigError:
        return saved
