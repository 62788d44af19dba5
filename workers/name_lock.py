"""One job at a time per workspace, entity and file name, fleet-wide, for `version` and `skip`.

Two jobs that both look up `report.pdf` on a task, find nothing and both create it would leave
two files. So the lookup and whatever the job then does (a version, a new file through the
three steps) are done by one job at a time: the lock (producers.keys.name_lock_key) holds the
job id that owns the name. The next job takes it over as soon as the owner's record shows it
ended (done, failed, dead) or is gone, so every way a job ends (a step, the sweeper, an
operator's purge) frees the name without a hook; a job that ends done in a step
(workers.steps.finish_done) also deletes its lock at once. The TTL only bounds a lock whose
record vanished without ending.

The script reads the owner's record by a key built inside it (standalone Redis or Sentinel,
as the project runs; kombu has no Redis Cluster transport).
"""

from __future__ import annotations

from collections.abc import Mapping

import redis

from producers.keys import JOB_PREFIX, name_lock_key

LOCK_TTL_SECONDS = 24 * 3600

_ACQUIRE = """
local owner = redis.call("GET", KEYS[1])
if owner and owner ~= ARGV[1] then
  local state = redis.call("HGET", ARGV[3] .. owner, "state")
  if state and state ~= "done" and state ~= "failed" and state ~= "dead" then
    return owner
  end
end
redis.call("SET", KEYS[1], ARGV[1], "EX", tonumber(ARGV[2]))
return false
"""

_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"""


class NameLocks:
    def __init__(self, client: redis.Redis, ttl: int = LOCK_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def acquire(self, key: str, job_id: str) -> str | None:
        """None when `job_id` owns the name now (or already did); else the owner's job id."""
        owner = self._acquire(keys=[key], args=[job_id, self.ttl, JOB_PREFIX])
        if owner is None:
            return None
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    def release(self, key: str, job_id: str) -> None:
        """Free the name early when this job ends in a step of its own (others may go on)."""
        self._release(keys=[key], args=[job_id])


def name_key(record: Mapping[str, str]) -> str:
    """The lock of the job's workspace, target and file name."""
    return name_lock_key(record["workspace"], record["target"], record["file_name"])


def release_job_name(client: redis.Redis, job_id: str, record: Mapping[str, str]) -> None:
    """A `version` or `skip` job that ends frees the name it may hold (no-op for others)."""
    if record.get("on_existing") in ("version", "skip"):
        NameLocks(client).release(name_key(record), job_id)
