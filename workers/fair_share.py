"""Fair share of the fleet's transfer slots: one workspace's backlog never holds up another's.

Why this mechanism. Celery queues are first in, first out: with workspace A's 1,000 transfers in
`awork.transfer`, workspace B's file waits for all of them. Two ways out were weighed:

- per-workspace queues consumed round-robin (kombu's Redis transport cycles over the queues a
  worker consumes): every worker would have to subscribe to each new workspace's queue at run
  time, the sweeper and metrics would have to find them, round-robin has no weights, and a
  message in a queue cannot age;
- a fleet-wide share kept in Redis, decided when a transfer step is taken (this module): the
  queues stay as they are, and so do late acks, the sweeper's restore, fencing and the single
  link of a chain.

How it works. A transfer step (`put_file`, `multipart_upload`) asks `admit` before it starts.
All state is in Redis, changed by one Lua script (workers/fair_share.lua), so every worker of the
fleet sees the same. The jobs are in sorted sets per workspace; the rest (capacity, the active
workspaces with their weights, virtual times and counts) is one value, `awork:fair:book`, that a
call reads once: a transfer costs about ten Redis commands over its three calls, not thirty.

- capacity C: the transfer slots of the live workers (each registers its thread count, renewed
  every REGISTER_EVERY_SECONDS; a dead worker's registration lapses);
- a workspace is active while it has transfers in flight (leases), transfers waiting for a slot,
  or transfers on their way (a generate step just finished: `expect`);
- its share: ceil(C * weight / sum of the active workspaces' weights), at least 1 slot; weight is
  `share` in its workspaces table or connection (default 1);
- a step is admitted when its workspace holds fewer leases than its share, or when slots are
  spare and no other workspace under its share wants one (a workspace alone gets the whole
  fleet). Otherwise the job waits in its workspace's waiting list (a sorted set, ranked by
  arrival plus the priority's aging offset) and its message is acknowledged without continuing
  the chain (`Ignore`): the backlog leaves the broker queue in milliseconds per message, so
  the messages behind it (another workspace's) are reached at once, and nothing cycles
  through the broker while it waits (no polling);
- every lease given back (a step ends, however) dispatches waiting jobs into free slots: the
  workspace under its share with the least virtual time (bytes sent divided by weight: weighted
  fair queuing) gets the slot; the job's lease is reserved and its step is published again
  from its record (put -> link, exactly as the sweeper re-drives a job; every step checks the
  record first, so a late copy does nothing twice). The sweeper also dispatches each pass, so a
  lost wake-up or a new worker's slots are used within a sweep interval;
- leases expire unless their step's lock (kept alive by the step lock's heartbeat) still
  exists: a killed worker's slots free themselves after the lock TTL, and its step is restored
  by the sweeper as before. Reservations whose message never started lapse after
  RESERVE_SECONDS.

AWORK_FAIR_SHARE=off turns admission off (every transfer starts at once, FIFO as before); a
switch for comparisons and emergencies. AWORK_PRIORITY_AGING_SECONDS (default 300) is the rank
offset of a bulk job in a waiting list (normal: a tenth of it, high: 0): a bulk job goes ahead
of higher-priority jobs that arrived more than that after it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from producers.config import ConfigError, env_float
from producers.keys import FAIR_PREFIX, JOB_PREFIX, fair_waiting_key
from producers.priority import Priority

REGISTER_EVERY_SECONDS = 10.0
REGISTRATION_TTL_SECONDS = 35.0
# A dispatched job's message must start within this long, else its reserved slot lapses.
RESERVE_SECONDS = 120.0
# A generate step's announcement that a transfer is coming counts this long.
DEMAND_SECONDS = 60.0
MIB = 1024 * 1024

_SCRIPT = Path(__file__).with_name("fair_share.lua").read_text()


def waiting_key(workspace: str) -> str:
    """Sorted set: jobs of the workspace waiting for a transfer slot -> rank."""
    return fair_waiting_key(workspace)


@dataclass(frozen=True)
class FairSettings:
    enabled: bool = True
    aging_seconds: float = 300.0  # rank offset of a bulk job; normal gets a tenth of it

    @classmethod
    def from_env(cls) -> FairSettings:
        raw = os.environ.get("AWORK_FAIR_SHARE", "on").strip().lower()
        if raw not in ("on", "off", "1", "0", "true", "false", ""):
            raise ConfigError(f"AWORK_FAIR_SHARE: expected on or off, got {raw!r}")
        aging = env_float("AWORK_PRIORITY_AGING_SECONDS", 300.0)
        if aging < 0:
            raise ConfigError(f"AWORK_PRIORITY_AGING_SECONDS: expected seconds >= 0, got {aging}")
        return cls(enabled=raw in ("on", "1", "true", ""), aging_seconds=aging)

    def rank(self, priority: Priority, now: float) -> float:
        """Position in a waiting list (lower goes first): arrival plus the priority's offset."""
        offset = {
            Priority.HIGH: 0.0,
            Priority.NORMAL: self.aging_seconds / 10,
            Priority.BULK: self.aging_seconds,
        }
        return now + offset[priority]


@dataclass(frozen=True)
class Admission:
    granted: bool
    dispatched: list[tuple[str, str]]  # (workspace, job id) given a slot: publish their step


@dataclass(frozen=True)
class WorkspaceShare:
    workspace: str
    in_flight: int  # transfers running or dispatched
    waiting: int  # transfers waiting for a slot
    expected: int  # transfers on their way (generate done, message not yet taken)
    weight: float
    slots: int  # its share now, in transfer slots
    capacity: int


MAX_SHARE = 100.0


def check_share(value: object, where: str) -> float:
    """A workspace's weight (`share`): a number with 0 < share <= MAX_SHARE; default 1."""
    if value is None or value == "":
        return 1.0
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SHARE:
        raise ConfigError(f"{where}: expected a number with 0 < share <= {MAX_SHARE:g}, got {value!r}")
    return float(value)


def cost_of(size: int | None) -> float:
    """A transfer's charge against its workspace's virtual time: MiB, at least 1/16."""
    return max(size or MIB, MIB // 16) / MIB


class FairShare:
    """The fleet's transfer slots, shared across workspaces; see the module docstring."""

    def __init__(
        self, client: redis.Redis, lease_seconds: float, settings: FairSettings | None = None
    ) -> None:
        self.redis = client
        self.lease_seconds = lease_seconds
        self.settings = settings or FairSettings()
        self._script = client.register_script(_SCRIPT)

    def _call(self, mode: str, *args: object, now: float | None = None) -> list[object]:
        argv = [
            mode,
            repr(time.time() if now is None else now),
            FAIR_PREFIX,
            JOB_PREFIX,
            repr(self.lease_seconds),
            repr(RESERVE_SECONDS),
            repr(DEMAND_SECONDS),
            *(str(a) for a in args),
        ]
        return list(self._script(keys=[], args=argv))

    def admit(
        self,
        workspace: str,
        job_id: str,
        weight: float,
        size: int | None,
        priority: Priority,
        now: float | None = None,
    ) -> Admission:
        """May this job's transfer start now? If not, it waits in its workspace's list."""
        at = time.time() if now is None else now
        rank = self.settings.rank(priority, at)
        reply = self._call("admit", workspace, job_id, weight, cost_of(size), repr(rank), now=at)
        return Admission(bool(int(reply[0])), _pairs(reply[1:]))  # type: ignore[call-overload]

    def release(self, workspace: str, job_id: str, now: float | None = None) -> list[tuple[str, str]]:
        """Give the slot back; returns the waiting jobs dispatched into free slots."""
        return _pairs(self._call("release", workspace, job_id, now=now))

    def dispatch(self, now: float | None = None) -> list[tuple[str, str]]:
        return _pairs(self._call("dispatch", now=now))

    def expect(self, workspace: str, job_id: str, weight: float, now: float | None = None) -> None:
        """A transfer of this workspace is on its way (its message is being published)."""
        self._call("expect", workspace, job_id, weight, now=now)

    def register(self, host: str, slots: int, now: float | None = None) -> None:
        """This worker's transfer slots (0: it leaves)."""
        self._call("register", host, slots, REGISTRATION_TTL_SECONDS, now=now)

    def drain(self, limit: int = 500) -> list[tuple[str, str]]:
        """Take up to `limit` jobs off the waiting lists, whatever the shares: with the fair
        share turned off, nothing else would ever dispatch them."""
        out: list[tuple[str, str]] = []
        prefix = fair_waiting_key("")
        for key in self.redis.scan_iter(match=f"{prefix}*", count=100):
            name = _s(key)
            popped: list[tuple[bytes, float]] = self.redis.zpopmin(name, limit - len(out))  # type: ignore[assignment]
            out += [(name[len(prefix) :], _s(job)) for job, _ in popped]
            if len(out) >= limit:
                break
        return out

    def snapshot(self, now: float | None = None) -> list[WorkspaceShare]:
        reply = [_s(x) for x in self._call("snapshot", now=now)]  # type: ignore[arg-type]
        capacity = int(reply[0])
        rows = []
        for i in range(2, len(reply), 6):
            ws, inflight, waiting, demand, weight, slots = reply[i : i + 6]
            rows.append(
                WorkspaceShare(
                    ws, int(inflight), int(waiting), int(demand), float(weight), int(slots), capacity
                )
            )
        return rows


def _pairs(flat: list[object]) -> list[tuple[str, str]]:
    items = [_s(x) for x in flat]  # type: ignore[arg-type]
    return [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]


def _s(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
