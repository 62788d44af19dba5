"""Redis key names: every format is pinned, so data already in Redis stays readable."""

from __future__ import annotations

import re
from pathlib import Path

import fakeredis

from producers import keys

ROOT = Path(__file__).resolve().parent.parent
JOB = "0123456789abcdef0123456789abcdef"


def test_job_keys_keep_their_formats() -> None:
    assert keys.JOB_PREFIX == "awork:job:"
    assert keys.job_key(JOB) == f"awork:job:{JOB}"
    assert keys.step_lock_key(JOB, "put") == f"awork:job:{JOB}:lock:put"
    assert keys.block_journal_key(JOB) == f"awork:job:{JOB}:blocks"
    assert keys.INDEX_KEY == "awork:jobs"
    assert keys.ACTIVE_KEY == "awork:jobs:active"
    assert keys.DEAD_KEY == "awork:jobs:dead"
    assert keys.ENDED_KEY == "awork:jobs:ended"
    assert keys.EVENTS_CHANNEL == "awork:job-events"
    assert keys.STEP_LOCK_PATTERN == "awork:job:*:lock:*"
    assert keys.idempotency_key("acme", "k-1") == "awork:idem:acme:k-1"


def test_hashed_keys_keep_their_digests() -> None:
    # The first 32 hex digits of sha256("report.pdf") and of sha256("/data/out"): a name lock or
    # a sync state written before must be found again.
    assert keys.name_lock_key("acme", "task:t1", "report.pdf") == (
        "awork:namelock:acme:task:t1:6466e450a16b77b865c5829d6b6c56d9"
    )
    assert keys.sync_state_key("acme", "task:t1", "/data/out") == (
        "awork:sync:acme:task:t1:e6e5374ef7478c008b88f25b826e91e6"
    )


def test_batch_connection_and_token_keys_keep_their_formats() -> None:
    assert keys.batch_key(JOB) == f"awork:batch:{JOB}"
    assert keys.batch_jobs_key(JOB) == f"awork:batch:{JOB}:jobs"
    assert keys.batch_idempotency_key("owner", "k") == "awork:idem-batch:owner:k"
    assert keys.WORKSPACES_KEY == "awork:workspaces"
    assert keys.CONNECTIONS_KEY == "awork:connections"
    assert keys.CONNECTION_CHANGES_CHANNEL == "awork:connections:changes"
    assert keys.CONNECTIONS_REFRESHED_KEY == "awork:connections:refreshed"
    assert keys.connection_key("acme") == "awork:conn:acme"
    assert keys.connection_refresh_lock_key("acme") == "awork:conn:acme:refresh-lock"
    assert keys.oauth_pending_key("s1") == "awork:oauth:pending:s1"
    assert keys.API_TOKENS_KEY == "awork:api-tokens"
    assert keys.api_token_key("t1") == "awork:api-token:t1"
    assert keys.api_rate_key("t1", 1700000000) == "awork:api-rate:t1:1700000000"


def test_fleet_keys_keep_their_formats() -> None:
    assert keys.SWEEPER_LEASE_KEY == "awork:sweeper:lease"
    assert keys.KEEPALIVE_LEASE_KEY == "awork:connections:keepalive-lease"
    assert keys.RATE_LIMIT_PREFIX == "awork:rl"
    assert keys.rate_limit_key("acme", "state") == "awork:rl:{acme}:state"
    assert keys.rate_limit_keys("acme") == ["awork:rl:{acme}:m", "awork:rl:{acme}:s", "awork:rl:{acme}:state"]
    assert keys.FAIR_PREFIX == "awork:fair:"
    assert keys.fair_waiting_key("acme") == "awork:fair:wait:acme"
    assert keys.fair_lease_key("acme") == "awork:fair:lease:acme"
    assert keys.blob_host_no_blocks_key("Blob.Example") == "awork:blobhost:blob.example:no-blocks"
    assert keys.KOMBU_UNACKED_KEY == "unacked"
    assert keys.KOMBU_UNACKED_INDEX_KEY == "unacked_index"


def test_the_modules_build_keys_from_here() -> None:
    """The worker and producer modules read these formats from producers.keys."""
    from producers.connections import REFRESHED_KEY, refresh_lock_key
    from workers.block_journal import RedisBlockJournal
    from workers.fair_share import waiting_key
    from workers.ratelimit import RateLimiter

    assert RedisBlockJournal(None, JOB).key == keys.block_journal_key(JOB)
    assert waiting_key("acme") == keys.fair_waiting_key("acme")
    assert REFRESHED_KEY == keys.CONNECTIONS_REFRESHED_KEY
    assert refresh_lock_key("acme") == keys.connection_refresh_lock_key("acme")
    assert RateLimiter(fakeredis.FakeRedis()).keys("acme") == keys.rate_limit_keys("acme")


# Modules that still write a key format out themselves; none may join this list.
STILL_LITERAL: set[str] = set()
_LITERAL = re.compile(r"""["']awork:[a-z{*]""")


def test_no_other_module_writes_a_key_format_out() -> None:
    found = set()
    for folder in ("producers", "workers", "ops"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".lua") or path.name == "keys.py":
                continue
            if _LITERAL.search(path.read_text()):
                found.add(str(path.relative_to(ROOT)))
    assert found <= STILL_LITERAL, sorted(found - STILL_LITERAL)
