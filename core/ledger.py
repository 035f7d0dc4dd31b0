"""The experience ledger: for every PPO batch, which prompts it holds, which worker generated each shard with
which policy version, and which learner version consumed it.

It is saved in every PPO checkpoint and restored on resume, so across crashes it is the record that proves
exactly-once experience: `audit` checks that every batch the run needed was consumed once, with exactly the
prompts the seeded prompt order assigns it, and lists the shards that were dispatched again after a worker
died. Plain data, no Ray: it tests in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


class LedgerError(RuntimeError):
    """A batch would be consumed twice, consumed before it was collected, or recorded out of order."""


@dataclass
class ShardAttempt:
    """One dispatch of one shard; a shard whose worker died gets a second attempt, and so on."""

    shard: int
    worker: int
    attempt: int  # 0 for the first dispatch
    outcome: str = "dispatched"  # dispatched | generated | failed | regenerated (sent again, see `regenerated`)
    error: str = ""


@dataclass
class BatchEntry:
    batch_id: int
    prompt_indices: list[int]  # the batch's prompts, once each (before repetition for n samples)
    version: int  # the policy version it is generated with (the published version at dispatch)
    shards: list[ShardAttempt] = field(default_factory=list)
    collected: bool = False
    consumed_by: int | None = None  # the learner version that trained on it (it then became consumed_by + 1)
    restored: bool = False  # loaded from a checkpoint's buffer on resume instead of being generated again
    recalls: list[dict] = field(default_factory=list)  # reference/reward calls made again after their actor died
    # response tokens per policy version that sampled them ({"3": 410, "4": 102}): in-flight rollout moves a
    # sequence to a newer version mid-way; otherwise every token is `version`'s
    token_versions: dict[str, int] = field(default_factory=dict)
    # streamed batches (rollout.inflight_batches stream): the learner version that trained each shard ({"2": 5});
    # the batch is consumed once all its shards are, `consumed_by` then the last of them
    consumed_shards: dict[str, int] = field(default_factory=dict)
    shard_prompts: dict[str, list[int]] = field(default_factory=dict)  # streamed: each trained shard's prompts

    def shard_ids(self) -> set[int]:
        return {a.shard for a in self.shards}


@dataclass(frozen=True)
class LedgerAudit:
    """What `ExperienceLedger.audit` found; `ok` when nothing was lost, duplicated or mismatched."""

    consumed: int
    lost: list[int]  # batches the run needed that were never consumed
    mismatched: list[int]  # batches whose prompts differ from the seeded prompt order's
    duplicate_prompts: list[int]  # batches holding a prompt twice
    redispatched: list[dict]  # {"batch", "shard", "role", "error", ...} per call dispatched again after a death
    restored: list[int]  # buffered batches restored from a checkpoint on resume
    # {"batch", "shard", "why"} per streamed shard dropped untrained and generated again (stale tokens, or in
    # flight at the checkpoint a run resumed from)
    regenerated: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.mismatched or self.duplicate_prompts)


class ExperienceLedger:
    def __init__(self, batches: dict[int, BatchEntry] | None = None):
        self.batches: dict[int, BatchEntry] = batches or {}

    def dispatched(self, batch_id: int, prompt_indices: list[int], version: int, workers: list[int]) -> None:
        if batch_id in self.batches:
            raise LedgerError(f"batch {batch_id} dispatched twice")
        self.batches[batch_id] = BatchEntry(batch_id, list(prompt_indices), version,
                                            [ShardAttempt(s, w, 0) for s, w in enumerate(workers)])

    def _last_attempt(self, batch_id: int, shard: int) -> ShardAttempt:
        return [a for a in self.batches[batch_id].shards if a.shard == shard][-1]

    def redispatched(self, batch_id: int, shard: int, worker: int, error: str) -> int:
        """The shard's last attempt failed (its worker died); record a new attempt. Returns its number."""
        last = self._last_attempt(batch_id, shard)
        if last.outcome != "dispatched":
            raise LedgerError(f"batch {batch_id} shard {shard}: attempt {last.attempt} already {last.outcome}")
        return self._next_attempt(batch_id, last, worker, "failed", error)

    def _next_attempt(self, batch_id: int, last: ShardAttempt, worker: int, outcome: str, error: str) -> int:
        """Close the shard's `last` attempt with `outcome` and record the next one, on `worker`; its number."""
        last.outcome, last.error = outcome, error
        self.batches[batch_id].shards.append(ShardAttempt(last.shard, worker, last.attempt + 1))
        return last.attempt + 1

    def regenerated(self, batch_id: int, shard: int, worker: int, why: str) -> int:
        """The shard's last attempt is dropped untrained and the shard generated again (streamed batches: its
        tokens were past the staleness bound, or a resumed run lost the attempt in flight). Returns the new
        attempt's number."""
        if str(shard) in self.batches[batch_id].consumed_shards:
            raise LedgerError(f"batch {batch_id} shard {shard} regenerated after it was consumed")
        return self._next_attempt(batch_id, self._last_attempt(batch_id, shard), worker, "regenerated", why)

    def recalled(self, batch_id: int, shard: int, role: str, error: str) -> None:
        self.batches[batch_id].recalls.append({"shard": shard, "role": role, "error": error})

    def collected(self, batch_id: int, shards: int, token_versions: dict[int, int] | None = None) -> None:
        entry = self.batches[batch_id]
        for s in range(shards):
            self._last_attempt(batch_id, s).outcome = "generated"
        entry.collected = True
        entry.token_versions = {str(v): n for v, n in sorted((token_versions or {}).items())}

    def consumed(self, batch_id: int, learner_version: int) -> None:
        entry = self.batches.get(batch_id)
        if entry is None or not entry.collected:
            raise LedgerError(f"batch {batch_id} consumed before it was collected")
        if entry.consumed_by is not None:
            raise LedgerError(f"batch {batch_id} consumed twice (by versions {entry.consumed_by} and {learner_version})")
        entry.consumed_by = learner_version

    def consumed_shard(self, batch_id: int, shard: int, learner_version: int, token_versions: dict[int, int],
                       prompts: list[int]) -> None:
        """Streamed batches: one shard generated and trained by `learner_version`, with the prompts its rollout
        holds (`prompts`, audited against the batch's); the batch is consumed with its last shard."""
        entry = self.batches.get(batch_id)
        if entry is None or shard not in entry.shard_ids():
            raise LedgerError(f"batch {batch_id} shard {shard} consumed but never dispatched")
        if str(shard) in entry.consumed_shards:
            raise LedgerError(f"batch {batch_id} shard {shard} consumed twice (by versions "
                              f"{entry.consumed_shards[str(shard)]} and {learner_version})")
        self._last_attempt(batch_id, shard).outcome = "generated"
        entry.consumed_shards[str(shard)] = learner_version
        entry.shard_prompts[str(shard)] = sorted(set(prompts))
        for v, n in token_versions.items():
            entry.token_versions[str(v)] = entry.token_versions.get(str(v), 0) + n
        entry.token_versions = dict(sorted(entry.token_versions.items(), key=lambda kv: int(kv[0])))
        if len(entry.consumed_shards) == len(entry.shard_ids()):
            entry.collected, entry.consumed_by = True, max(entry.consumed_shards.values())

    def unconsumed_shards(self) -> dict[int, list[int]]:
        """Streamed batches: {batch: its shards not trained yet}, of the batches dispatched and not consumed."""
        return {b: sorted(e.shard_ids() - {int(s) for s in e.consumed_shards})
                for b, e in sorted(self.batches.items()) if e.consumed_by is None}

    def mark_restored(self, batch_id: int) -> None:
        self.batches[batch_id].restored = True

    def audit(self, steps: int, expected_prompts: Callable[[int], list[int]]) -> LedgerAudit:
        """Check batches 0..steps-1 against `expected_prompts(batch_id)` (the seeded prompt order)."""
        lost = [b for b in range(steps) if b not in self.batches or self.batches[b].consumed_by is None]
        mismatched, dupes, redispatched, regenerated = [], [], [], []
        for b, e in sorted(self.batches.items()):
            if e.consumed_by is None:
                continue
            trained = [i for ps in e.shard_prompts.values() for i in ps] if e.consumed_shards else e.prompt_indices
            if sorted(e.prompt_indices) != sorted(expected_prompts(b)) or sorted(trained) != sorted(e.prompt_indices):
                mismatched.append(b)  # streamed: its shards' prompts together, once each, are the batch's
            if len(set(e.prompt_indices)) != len(e.prompt_indices):
                dupes.append(b)
            redispatched += [{"batch": b, "shard": a.shard, "role": "rollout", "failed_worker": a.worker,
                              "error": a.error} for a in e.shards if a.outcome == "failed"]
            regenerated += [{"batch": b, "shard": a.shard, "why": a.error} for a in e.shards if a.outcome == "regenerated"]
            redispatched += [{"batch": b, **r} for r in e.recalls]
        return LedgerAudit(sum(e.consumed_by is not None for e in self.batches.values()), lost, mismatched, dupes,
                           redispatched, [b for b, e in sorted(self.batches.items()) if e.restored], regenerated)

    def to_json(self) -> list[dict]:
        return [asdict(e) for _, e in sorted(self.batches.items())]

    @classmethod
    def from_json(cls, rows: list[dict]) -> ExperienceLedger:
        batches = {}
        for r in rows:
            shards = [ShardAttempt(**a) for a in r["shards"]]
            batches[r["batch_id"]] = BatchEntry(**{**r, "shards": shards})
        return cls(batches)
