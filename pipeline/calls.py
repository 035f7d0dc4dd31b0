"""Waiting on Ray: one `ray_get` with one timeout error, and the timer of the driver's numbered stages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError


class RoleTimeout(TimeoutError):
    """A role did not finish (or start, or come back) within its configured limit: the message names the role,
    the config key and its value, so the user knows what hung and what to raise."""

    def __init__(self, what: str, seconds: float, key: str = "ppo.sync_timeout_s", did: str = "finish",
                 hint: str = ""):
        super().__init__(f"{what} did not {did} within {key}={seconds}s{hint}")


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error, cut: Ray's errors carry the remote traceback after it."""
    return str(e).splitlines()[0][:limit] if str(e) else type(e).__name__


def ray_get(refs, what: str, timeout_s: float, hint: Callable[[], str] | None = None):
    """ray.get under a timeout: a hung peer becomes `RoleTimeout` naming `what`, a dead actor a RuntimeError
    naming it and ending with `hint()` (where the run can be resumed from). Of several calls, the first to fail
    ends the wait: calls that wait on each other (a group's ranks in a collective) would otherwise hang on a dead
    peer until the timeout."""
    try:
        if isinstance(refs, list) and len(refs) > 1:
            _first_failure(refs, timeout_s)
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as e:
        raise RoleTimeout(what, timeout_s) from e
    except RayActorError as e:
        raise RuntimeError(f"{what} failed: an actor died: {str(e).splitlines()[0]}"
                           f"{hint() if hint else ''}") from e


def _first_failure(refs: list, timeout_s: float) -> None:
    """Wait for `refs` in the order they finish; raise the first one's error at once (GetTimeoutError past
    `timeout_s`)."""
    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while pending:
        finished, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not finished:
            raise GetTimeoutError(f"{len(pending)} of {len(refs)} calls not finished within {timeout_s}s")
        ray.get(finished[0])


def done(ref: ray.ObjectRef) -> bool:
    """Whether `ref` has resolved, without waiting."""
    return bool(ray.wait([ref], timeout=0)[0])


class StageTimer:
    """Wall time of each numbered stage of one driver step, as `timing/<stage>_s` metrics plus `timing/step_s`.

    A stage timed twice in one step (its parts run apart) reports the sum.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"timing/{name}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {**self.seconds, "timing/step_s": time.perf_counter() - self.start}


def await_restart(actor: ActorHandle, what: str, timeout_s: float, max_restarts: int, hint: str = "") -> None:
    """Wait until Ray has restarted `actor` (a call to it succeeds); an error naming it when it cannot."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except ActorUnavailableError:  # still restarting
            if time.monotonic() > deadline:
                raise RoleTimeout(what, timeout_s, did="come back") from None
            time.sleep(0.5)
        except GetTimeoutError as e:
            raise RoleTimeout(what, timeout_s, did="come back") from e
        except RayActorError as e:
            raise RuntimeError(f"{what} died and Ray did not restart it (ppo.max_actor_restarts={max_restarts})"
                               f"{hint}") from e
