"""A rollout worker's in-flight decode loop (`rollout.inflight`): generation never stops for a weight sync.

`InflightEngine` runs a `ContinuousDecoder` on a thread of its own. Generate calls hand it their request and
wait for their rows; weight loads hand it the copy to run and wait until it ran. Between two decode steps the
loop applies the loads that arrived (sequences in progress go on under the new version, each token tagged with
the version that sampled it) and admits waiting requests into the rows that finished ones freed.

Two ways to apply a load:
- on arrival (default): at the first step boundary after it arrives. Which token gets which version depends on
  timing, so two runs differ;
- deterministic (`rollout.inflight_deterministic`): requests run one at a time, in the order the driver sent
  them, each in its own forward (so float rounding does not depend on what else runs), and a request switches
  to the next version at a fixed decode step (`RolloutRequest.switch`), waiting for it if it has not arrived. A
  run is then repeatable bit for bit, at the cost of continuous batching.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from rayrlhf.core.decode import ContinuousDecoder, DecodeRequest, Sampled
from rayrlhf.core.experience import RolloutRequest, VersionMismatch


@dataclass
class _Load:
    version: int
    apply: Callable[[], None]  # copies the weights into the model and verifies them
    after_requests: int | None  # deterministic: apply on its own only once this many requests finished
    done: Future = field(default_factory=Future)


@dataclass
class _Job:
    req: RolloutRequest
    done: Future = field(default_factory=Future)
    started: float = 0.0
    decoder: ContinuousDecoder | None = None
    decoding: DecodeRequest | None = None


@dataclass(frozen=True)
class Generated:
    """A request's rows and when its decoding started and ended (wall clock of this process)."""

    sampled: Sampled
    seconds: float
    started: float  # wall clock (time.time) when its rows joined the loop


class InflightEngine:
    def __init__(self, make_decoder: Callable[[], ContinuousDecoder], max_rows: int, deterministic: bool,
                 wait_s: float, restarted: bool = False):
        self.make_decoder, self.max_rows, self.deterministic, self.wait_s = make_decoder, max_rows, deterministic, wait_s
        # Out of the driver's deterministic order: a worker Ray restarted (it lost its place), or one the driver
        # took out of it (`leave_order`). A request with a place in the order then fails at once as a version
        # mismatch (the driver sends it again without one), and a load waits for no request.
        self.unordered = restarted
        # on arrival, every request's rows share one decoder; deterministic, each request has its own
        self.decoder = make_decoder()
        self.version = 0  # the version the model holds
        self.cond = threading.Condition()
        self.waiting: list[_Job] = []
        self.running: list[_Job] = []
        self.loads: list[_Load] = []
        self.finished = 0  # requests finished
        self.next_seq = 0  # deterministic: the next request to admit, in the driver's order
        self.seen: set[int] = set()  # deterministic: the `seq` of every request that arrived
        self.busy_s = 0.0  # seconds spent decoding and loading
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="inflight-decode", daemon=True)
        self.thread.start()

    # --- called from the actor's threads ------------------------------------------------------------

    def generate(self, req: RolloutRequest) -> Generated:
        job = _Job(req)
        with self.cond:  # under the lock: `leave_order` may run on another thread
            self._alive()
            if self.unordered and self.deterministic and req.seq is not None:
                raise self._out_of_order(req)
            self.waiting.append(job)
            if req.seq is not None:
                self.seen.add(req.seq)
            self.cond.notify_all()
        return job.done.result()

    def load(self, version: int, apply: Callable[[], None], after_requests: int | None = None) -> float:
        """Queue a weight load and wait until the loop ran it; returns the seconds from arrival to applied."""
        t0 = time.perf_counter()
        with self.cond:
            self._alive()
            load = _Load(version, apply, after_requests if self.deterministic and not self.unordered else None)
            self.loads.append(load)
            self.loads.sort(key=lambda x: x.version)
            self.cond.notify_all()
        load.done.result()
        return time.perf_counter() - t0

    def leave_order(self) -> None:
        """Deterministic: from now on this worker is out of the driver's order (the driver re-sent a request of it
        without a place, so the places after it never come). The requests waiting with a place fail at once, the
        loads waiting for requests are applied on arrival."""
        with self.cond:
            self.unordered = True
            for job in [j for j in self.waiting if j.req.seq is not None]:
                self.waiting.remove(job)
                job.done.set_exception(self._out_of_order(job.req))
            for load in self.loads:
                load.after_requests = None
            self.cond.notify_all()

    @staticmethod
    def _out_of_order(req: RolloutRequest) -> VersionMismatch:
        return VersionMismatch(f"rollout worker out of the deterministic order (restarted, or a request of it sent "
                               f"again): batch {req.batch_id} shard {req.shard} has place {req.seq} in it")

    def wait_idle(self) -> None:
        """Until no request or load is waiting or running (the calls sent before this one are done)."""
        with self.cond:
            while (self.waiting or self.running or self.loads) and self.error is None:
                self.cond.wait(timeout=1.0)

    def locked(self, fn: Callable[[], object]) -> object:
        """`fn` run between two decode steps (a checksum of the weights that generate); raises once the loop has
        stopped: a load that failed its engine check there left the worker's version ahead of what it computes with."""
        with self.cond:
            self._alive()
            return fn()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _alive(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the in-flight decode loop stopped: {self.error!r}") from self.error

    # --- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.closed and not self._can_work():
                        self.cond.wait(timeout=1.0)
                        self._expire()
                    if self.closed:
                        return
                    t0 = time.perf_counter()
                    if self.deterministic:  # a request admitted first may be what a load waits for
                        self._admit()
                    self._apply_loads()  # before admitting: a new request's prompt is cached by the new weights
                    self._admit()
                    finished = self._step()
                    self.busy_s += time.perf_counter() - t0
                    self.cond.notify_all()  # `wait_idle`
                for job in finished:  # outside the lock: the caller's thread builds its batch
                    seconds = time.perf_counter() - job.started
                    job.done.set_result(Generated(job.decoder.result(job.decoding), seconds, time.time() - seconds))
        except BaseException as e:  # every caller waiting gets the error, none hangs
            with self.cond:
                self.error = e
                for job in self.waiting + self.running:
                    if not job.done.done():
                        job.done.set_exception(e)
                for load in self.loads:
                    if not load.done.done():
                        load.done.set_exception(e)

    def _can_work(self) -> bool:
        return bool(self._ready_loads() or self._admissible() or self._steppable())

    def _ready_loads(self) -> list[_Load]:
        """Loads that may be applied now. On arrival: all. Deterministic, the next version, once every running
        request's schedule asks for it (or later) and every request sent before it (`after_requests`) arrived and
        runs or finished: a request that starts with an older version must never see it."""
        if not self.loads:
            return []
        if not self.deterministic or self.loads[0].version <= self.version:
            return list(self.loads)  # (`_apply_loads` skips one at or below the version held)
        load = self.loads[0]
        if any(job.req.seq is not None and self._version_wanted(job) < load.version for job in self.running):
            return []
        before = range(load.after_requests or 0)
        if not all(s in self.seen for s in before) or any(
                job.req.seq is not None and job.req.seq < len(before) for job in self.waiting):
            return []
        return [load]

    def _apply_loads(self) -> None:
        for load in self._ready_loads():
            self.loads.remove(load)
            if load.version <= self.version:  # overtaken by a newer one (calls of a threaded actor race): a worker
                load.done.set_result(None)    # never goes back to an older version
                continue
            try:
                load.apply()
                self.version = load.version
                decoders = {id(job.decoder): job.decoder for job in self.running}
                decoders.setdefault(id(self.decoder), self.decoder)
                for decoder in decoders.values():  # vLLM's probes the engine through its own steps
                    decoder.weights_changed(load.version)
            except BaseException as e:
                # The load's caller gets the error, and the loop stops (every caller waiting gets it too): the
                # model may hold part of the new weights, or weights its engine does not compute with.
                load.done.set_exception(e)
                raise
            load.done.set_result(None)

    def _admissible(self) -> list[_Job]:
        """Waiting requests that may join now: on arrival, whose version the worker holds (or a newer one), in the
        rows free; deterministic, the next in the driver's order if it starts with the version held."""
        if self.deterministic:
            out, seq = [], self.next_seq
            for job in sorted(self.waiting, key=lambda j: -1 if j.req.seq is None else j.req.seq):
                if job.req.seq is None:  # re-sent after a restart: on arrival, once its version is held
                    if job.req.version is None or job.req.version <= self.version:
                        out.append(job)
                elif job.req.seq == seq and job.req.version == self.version:
                    out.append(job)
                    seq += 1
            return out
        out, rows = [], len(self.decoder)
        for job in self.waiting:
            n = len(job.req.prompts)
            if job.req.version is not None and job.req.version > self.version:
                continue  # its version's load is on the way (a call can overtake another on a threaded actor)
            if rows and rows + n > self.max_rows:
                break
            out.append(job)
            rows += n
        return out

    def _admit(self) -> None:
        for job in self._admissible():
            self.waiting.remove(job)
            if self.deterministic and job.req.seq is not None:
                self.next_seq = job.req.seq + 1
            job.started = time.perf_counter()
            job.decoder = self.make_decoder() if self.deterministic else self.decoder
            job.decoder.version = self.version
            try:
                job.decoding = job.decoder.add(job, job.req.prompts, job.req.seed)
            except ValueError as e:  # a request the decoder refuses fails alone
                job.done.set_exception(e)
                continue
            self.running.append(job)

    def _stepping(self) -> list[_Job]:
        """Deterministic: the running requests whose next step runs with the version held (a request at its
        switch step waits for the next version)."""
        return [job for job in self.running if self._version_wanted(job) == self.version]

    def _steppable(self) -> bool:
        return bool(self._stepping()) if self.deterministic else bool(self.running)

    def _step(self) -> list[_Job]:
        if self.deterministic:
            for job in self.running:
                if self._version_wanted(job) < self.version:
                    raise RuntimeError(f"deterministic in-flight schedule broken: batch {job.req.batch_id} shard "
                                       f"{job.req.shard} needs v{self._version_wanted(job)}, the worker holds "
                                       f"v{self.version}")
            done = {id(req) for job in self._stepping() for req in job.decoder.step()}  # each in its own forward
        else:
            done = {id(req) for req in self.decoder.step()} if self.running else set()
        finished = [job for job in self.running if id(job.decoding) in done]
        for job in finished:
            self.running.remove(job)
            self.finished += 1
        return finished

    def _version_wanted(self, job: _Job) -> int:
        """Deterministic: the version the request's next decode step must run with (a request without a place in
        the order takes whatever is held)."""
        if job.req.seq is None:
            return self.version
        switch = job.req.switch
        if switch is not None and job.decoding is not None and job.decoding.steps >= switch[0]:
            return switch[1]
        return job.req.version

    def _expire(self) -> None:
        """A request whose version never came (its worker restarted and lost it) fails as a version mismatch,
        which the driver answers by loading that version and sending the request again."""
        now = time.perf_counter()
        for job in list(self.waiting):
            if job.req.version is not None and job.req.version > self.version:
                job.started = job.started or now
                if now - job.started > self.wait_s:
                    self.waiting.remove(job)
                    job.done.set_exception(VersionMismatch(
                        f"rollout worker holds policy v{self.version}, batch {job.req.batch_id} needs "
                        f"v{job.req.version}, which did not arrive within {self.wait_s:.0f} s"))
