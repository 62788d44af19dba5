"""Publishing the messages of jobs whose records are written, and what a failed publish leaves.

Order of writes, and why it is safe: the job record is written first (state `queued`,
`published=0`), then the canvas is published, then `published=1`.

- Publishing fails (Redis unreachable for the whole publish retry policy, ~6 s): the records and
  staged copies of the jobs not yet published are removed (retrying for `redis_retry_seconds`)
  before the error reaches the caller, so nothing half-done is left. `PublishFailed` names the
  jobs of the batch that did go out. Should Redis stay unreachable for the removal too, those
  records remain with `published=0` and the error says so (`pending_ids`): the workers' sweeper
  publishes them once Redis is back, so the caller must not enqueue them again.
- The producer dies between the two writes: a record with `published=0` remains and no message;
  the workers' sweeper publishes such records after a minute (steps are idempotent, so a
  message that did go out before the death only costs a no-op), so a record never stays without
  its message.
- A message without a record cannot happen, because no message is sent before its record
  exists (and a worker that meets a message whose record has expired drops it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from producers.canvas import job_canvas, step_kwargs
from producers.config import redact_url
from producers.keys import job_key
from producers.messages import Rendered, Templates, publish_rendered
from producers.prepare import Prepared
from producers.recurring import flow_canvas
from producers.redis_retry import RedisUnavailable

log = logging.getLogger("awork.producer")


class PublishFailed(RedisUnavailable):
    """Publishing a batch failed part-way.

    `published_ids`: jobs of the batch that were enqueued (they run). `pending_ids`: jobs whose
    record could not be removed either; the workers' sweeper publishes them once Redis is back,
    so they run too. Every other job of the batch left nothing behind.
    """

    def __init__(self, message: str, published_ids: list[str], pending_ids: list[str]) -> None:
        super().__init__(message)
        self.published_ids = published_ids
        self.pending_ids = pending_ids


def publish(
    prepared: list[Prepared],
    app: Celery,
    templates: Templates | None,
    client: redis.Redis,
    redis_url: str,
    undo: Callable[[list[Prepared]], list[str]],
) -> None:
    """Send the messages of `prepared` (their records exist) and mark them published.

    Jobs of a recurring flow (producers.recurring) start with a task of their own, sent through
    Celery; the default canvases go as pre-built messages (`templates`) where the broker allows.
    On failure `undo` removes what did not go out and returns the ids it could not remove;
    PublishFailed then tells the caller which jobs run.
    """
    if not prepared:
        return
    published: list[Prepared] = []
    # One pass: `p not in flows` compared every job with every other (seconds per 10,000).
    flows: list[Prepared] = []
    rendered: list[Prepared] = []
    for p in prepared:
        (flows if p.spec.placement.flow or templates is None else rendered).append(p)
    try:
        if flows:
            with app.producer_or_acquire() as producer:
                for p in flows:
                    kwargs = step_kwargs(p.job_id, p.spec.workspace, str(p.spec.target), p.spec.file_name)
                    canvas = flow_canvas(
                        app, p.spec.placement.flow, kwargs, p.spec.priority
                    ) or job_canvas(app, p.spec.target.three_steps, kwargs, p.spec.priority)
                    canvas.apply_async(producer=producer)
                    published.append(p)
        if rendered:
            assert templates is not None
            messages: list[Rendered] = []
            for p in rendered:
                kwargs = step_kwargs(p.job_id, p.spec.workspace, str(p.spec.target), p.spec.file_name)
                messages.append(templates.render(p.spec.target.three_steps, kwargs, p.spec.priority))
            keys = [job_key(p.job_id) for p in rendered]
            retry_publish(app, lambda: publish_rendered(client, messages, keys))
            # (marked published in the same transaction as the messages)
    except (OperationalError, redis.exceptions.RedisError, OSError, RedisUnavailable) as exc:
        sent = {p.job_id for p in published}
        pending = undo([p for p in prepared if p.job_id not in sent])
        mark_published(client, published)
        raise _failed(exc, redis_url, published, pending) from None
    mark_published(client, published)


def _failed(exc: Exception, redis_url: str, published: list[Prepared], pending: list[str]) -> PublishFailed:
    text = f"REDIS_URL: could not publish to {redact_url(redis_url)}: {exc}"
    if published:
        text += f"; {len(published)} job(s) of the batch were enqueued"
    if pending:
        text += (
            f"; {len(pending)} job record(s) could not be removed ({', '.join(pending[:5])}): "
            "the workers publish them once Redis is back, do not enqueue them again"
        )
    return PublishFailed(text, [p.job_id for p in published], pending)


def retry_publish(app: Celery, fn: Callable[[], None]) -> None:
    """Celery's publish retry policy, for the pre-built messages: a MULTI/EXEC that did not
    reach Redis is sent again; one whose answer was lost may leave messages behind that
    the workers drop (their records are undone)."""
    policy = app.conf.task_publish_retry_policy
    delay = float(policy.get("interval_start", 0.2))
    step, ceiling = float(policy.get("interval_step", 0.5)), float(policy.get("interval_max", 2))
    for attempt in range(int(policy.get("max_retries", 5)) + 1):
        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if attempt >= int(policy.get("max_retries", 5)):
                raise
            time.sleep(delay)
            delay = min(delay + step, ceiling)


def mark_published(client: redis.Redis, published: list[Prepared]) -> None:
    """Best effort: the messages are out, so the jobs are enqueued whatever happens here; a
    record left at published=0 only costs the sweeper a second, harmless publish."""
    if not published:
        return
    pipe = client.pipeline(transaction=False)
    for p in published:
        pipe.hset(job_key(p.job_id), "published", "1")
    try:
        pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("enqueued %d job(s) but could not mark them published: %s", len(published), exc)
