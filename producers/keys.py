"""Every Redis key name the fleet uses, in one place.

Producers, workers and ops tools build key names only through this module, so a format is
written out once. The formats are a storage contract: records, locks and indexes already in
Redis must stay readable after an upgrade, so a change here is a data migration, not a rename
(tests/test_keys.py pins every format). Lua scripts get their keys as KEYS[] (or, for the
scripts that derive keys per workspace, a prefix from here as an argument).
"""

from __future__ import annotations

import hashlib

NAMESPACE = "awork:"

# -- job records -----------------------------------------------------------------------------
JOB_PREFIX = f"{NAMESPACE}job:"  # + job id: the job record (a hash)
INDEX_KEY = f"{NAMESPACE}jobs"  # zset: job id -> created_at, every job whose record still exists
ACTIVE_KEY = f"{NAMESPACE}jobs:active"  # zset: job id -> created_at, jobs not yet finished
DEAD_KEY = f"{NAMESPACE}jobs:dead"  # zset: job id -> finished_at, failed and dead jobs (dead letters)
# zset: job id -> ended at, jobs that ended with a callback (or a batch) still to announce.
ENDED_KEY = f"{NAMESPACE}jobs:ended"
EVENTS_CHANNEL = f"{NAMESPACE}job-events"  # pub/sub: a JSON line when a job finishes
# SCAN pattern of every step lock (tools that count leftovers).
STEP_LOCK_PATTERN = f"{JOB_PREFIX}*:lock:*"


def job_key(job_id: str) -> str:
    """Hash: the job record (producers.job_record)."""
    return f"{JOB_PREFIX}{job_id}"


def step_lock_key(job_id: str, step: str) -> str:
    """String: the token of the run that holds the step (workers.step_lock)."""
    return f"{job_key(job_id)}:lock:{step}"


def block_journal_key(job_id: str) -> str:
    """Hash: the blocks of the job's upload the blob host acknowledged (workers.block_journal)."""
    return f"{job_key(job_id)}:blocks"


def idempotency_key(workspace: str, key: str) -> str:
    """String: the job id an idempotency key of the workspace names."""
    return f"{NAMESPACE}idem:{workspace}:{key}"


def name_lock_key(workspace: str, target: str, file_name: str) -> str:
    """String: the job id that may look up and create `file_name` on `target` (workers.name_lock)."""
    digest = hashlib.sha256(file_name.encode()).hexdigest()[:32]
    return f"{NAMESPACE}namelock:{workspace}:{target}:{digest}"


def sync_state_key(workspace: str, target: str, folder: str) -> str:
    """Hash: relative path -> what `awork-uploads sync` last sent from `folder` (producers.sync)."""
    digest = hashlib.sha256(folder.encode()).hexdigest()[:32]
    return f"{NAMESPACE}sync:{workspace}:{target}:{digest}"


# -- batches -----------------------------------------------------------------------------------
def batch_key(batch_id: str) -> str:
    """Hash: total, open (jobs not yet ended), callback_url, signer, workspace, created_at."""
    return f"{NAMESPACE}batch:{batch_id}"


def batch_jobs_key(batch_id: str) -> str:
    """Zset: job id -> its position in the batch request (pages of GET /v1/batches/{id})."""
    return f"{batch_key(batch_id)}:jobs"


def batch_idempotency_key(scope: str, key: str) -> str:
    """String: the batch id an idempotency key of the scope names."""
    return f"{NAMESPACE}idem-batch:{scope}:{key}"


# -- workspaces, connections, API tokens -------------------------------------------------------
WORKSPACES_KEY = f"{NAMESPACE}workspaces"  # set: workspace names the running workers know
CONNECTIONS_KEY = f"{NAMESPACE}connections"  # set: every registered connection name
CONNECTION_CHANGES_CHANNEL = f"{NAMESPACE}connections:changes"  # pub/sub: a changed connection's name
CONNECTIONS_REFRESHED_KEY = f"{NAMESPACE}connections:refreshed"  # zset: OAuth connection -> last refresh
OAUTH_PENDING_PREFIX = f"{NAMESPACE}oauth:pending:"  # + state: an authorization in progress
API_TOKENS_KEY = f"{NAMESPACE}api-tokens"  # set: every API token id


def connection_key(name: str) -> str:
    """Hash: kind, state, plan limits, version, timestamps, access-token expiry, `secret`."""
    return f"{NAMESPACE}conn:{name}"


def connection_refresh_lock_key(name: str) -> str:
    """String: one OAuth refresh at a time per connection across the fleet."""
    return f"{connection_key(name)}:refresh-lock"


def oauth_pending_key(state: str) -> str:
    return f"{OAUTH_PENDING_PREFIX}{state}"


def api_token_key(token_id: str) -> str:
    """Hash: name, workspaces (comma-separated), rate, hash, callback_secret, created_at."""
    return f"{NAMESPACE}api-token:{token_id}"


def api_rate_key(token_id: str, second: int) -> str:
    """Counter: an API token's requests in one second."""
    return f"{NAMESPACE}api-rate:{token_id}:{second}"


# -- the fleet's shared state --------------------------------------------------------------------
SWEEPER_LEASE_KEY = f"{NAMESPACE}sweeper:lease"  # string: the one sweeper at work
KEEPALIVE_LEASE_KEY = f"{NAMESPACE}connections:keepalive-lease"  # string: the one OAuth keepalive
# The rate limiter's keys are `<prefix>:{<workspace>}:<part>` (one hash slot per workspace).
RATE_LIMIT_PREFIX = f"{NAMESPACE}rl"
FAIR_PREFIX = f"{NAMESPACE}fair:"  # fair_share.lua derives `wait:`, `lease:`... keys from it


# Its parts, in the order ratelimit.lua takes them as KEYS: the minute log and the second log
# (zsets) and the state (a hash: pause, learned limits, member counter, pacing, bookkeeping).
# Up to 2026-11 the state was four keys (`pause`, `learned`, `seq`, `pace`), left to expire.
RATE_LIMIT_PARTS = ("m", "s", "state")


def rate_limit_key(workspace: str, part: str, prefix: str = RATE_LIMIT_PREFIX) -> str:
    """One of the rate limiter's keys of a workspace (workers.ratelimit): m, s or state."""
    return f"{prefix}:{{{workspace}}}:{part}"


def rate_limit_keys(workspace: str, prefix: str = RATE_LIMIT_PREFIX) -> list[str]:
    """The rate limiter's keys of a workspace, in RATE_LIMIT_PARTS order (ratelimit.lua's KEYS)."""
    return [rate_limit_key(workspace, part, prefix) for part in RATE_LIMIT_PARTS]


def fair_waiting_key(workspace: str) -> str:
    """Zset: jobs of the workspace waiting for a transfer slot -> rank (workers.fair_share)."""
    return f"{FAIR_PREFIX}wait:{workspace}"


def fair_lease_key(workspace: str) -> str:
    """Zset: jobs of the workspace holding (or dispatched into) a transfer slot -> expiry."""
    return f"{FAIR_PREFIX}lease:{workspace}"


def blob_host_no_blocks_key(host: str) -> str:
    """String: why an upload host refuses block uploads (workers.blob); expires after a day."""
    return f"{NAMESPACE}blobhost:{host.lower()}:no-blocks"


# -- kombu's Redis transport (not ours; named here so that tools read them in one way) -----------
KOMBU_UNACKED_KEY = "unacked"  # hash: delivery tag -> message delivered and not yet acknowledged
KOMBU_UNACKED_INDEX_KEY = "unacked_index"  # zset: delivery tag -> delivered at
