"""A job's priority within its workspace: `high`, `normal` (default) or `bulk`.

Priority orders the jobs of one workspace; it never buys a workspace more of the fleet than its
share (workers/fair_share.py decides that). It acts in two places:

- the broker: each step's message carries a kombu priority (BROKER_PRIORITY), so a high job's
  step is taken before the normal and bulk steps waiting in the same queue (kombu's Redis
  transport keeps one list per priority step and reads them in order);
- the fair-share waiting list of the workspace (workers/fair_share.py), where transfers wait
  for a slot: ranked by arrival time plus an offset per priority (aging), so a bulk job goes
  ahead of high jobs that arrived more than its offset after it, and never starves there.
"""

from __future__ import annotations

from enum import StrEnum

from producers.contract import SpecError


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    BULK = "bulk"


DEFAULT_PRIORITY = Priority.NORMAL

# kombu's Redis transport: 0 is read first (the plain list), then 3, 6, 9 (its priority_steps).
BROKER_PRIORITY: dict[Priority, int] = {Priority.HIGH: 0, Priority.NORMAL: 3, Priority.BULK: 6}
# Transfer steps sit one priority step below API steps of the same job priority
# (producers/canvas.message_options says why).
TRANSFER_PRIORITY_OFFSET = 3
# A deferred API step (a rate wait, an error retry, a lock recheck: its message carries a
# countdown) is re-published at the lowest level. Held until due, it needs no early fetch, and
# at its job's level a workspace deferring hundreds of steps a second (a backlog at its rate
# limit) would keep every worker fetching those first, leaving threads idle while transfers
# wait in the queue.
RETRY_PRIORITY = 9


def check_priority(value: object, field: str = "priority") -> Priority:
    """A Priority from a producer's input; a SpecError naming the field otherwise."""
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(p.value for p in Priority)
    raise SpecError(field, f"expected one of {choices}, got {value!r}")


def record_priority(record: dict[str, str]) -> Priority:
    """The priority a job record carries (records written before priorities existed: normal)."""
    try:
        return Priority(record.get("priority") or DEFAULT_PRIORITY.value)
    except ValueError:
        return DEFAULT_PRIORITY
