"""Completion callbacks: the `awork.deliver_callback` task, on the `awork.callbacks` queue.

A job that ends (done, failed, dead, canceled) with a `callback_url` or `on_done`, or the last
job of a batch with a `callback_url`, is announced once (producers.endings); this task delivers:

- `on_done` (Python producers): `send_task(name, args=[job])` to the producer's own app, on
  `celery` or the queue named after `@`.
- `callback_url`: a POST of the event as JSON, signed the Standard Webhooks way: headers
  `webhook-id` (the event id, the same for every retry and re-announcement: de-duplicate on it),
  `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 over
  "<id>.<timestamp>.<body>">` with the secret of the API token that enqueued the job (shown once
  by `api-tokens create`; `whsec_` + base64 key). Any 2xx is delivery; anything else (or no
  answer in 5+10 s) is retried with exponential backoff and full jitter, capped at 10 minutes
  between tries (below the broker's visibility timeout), for AWORK_CALLBACK_MAX_AGE seconds
  (default 24 h) after the first try; then the record says `callback_state=failed`.

Safety: the URL is checked against AWORK_CALLBACK_HOSTS again before every POST (a record is
data anyone with Redis access can write), redirects are not followed, the answer's body is not
read, and logs and the record name the host:port and status only, never the URL's path or
query. No Authorization header and no secret goes anywhere but into the signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import time
from typing import Any

import requests
from celery import Task
from celery.exceptions import Ignore

from producers.api_tokens import ApiTokens
from producers.callback_url import callback_refused
from producers.contract import QUEUE_CALLBACKS, TASK_DELIVER_CALLBACK
from producers.job_ids import is_job_id
from producers.job_record import Field, JobRecord
from producers.keys import batch_key
from producers.redis_text import as_str
from producers.source_url import parse_http_url
from workers.celery_app import app
from workers.runtime import Runtime, runtime

log = logging.getLogger("awork.callbacks")

MAX_DELAY_SECONDS = 600.0
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 10.0
USER_AGENT = "awork-uploads-callbacks/1"


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` over `<id>.<timestamp>.<body>` (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def backoff(attempt: int, base: float) -> float:
    """Full jitter under a ceiling that doubles per attempt, at most MAX_DELAY_SECONDS."""
    ceiling = min(MAX_DELAY_SECONDS, base * 2 ** min(attempt, 30))
    return random.uniform(ceiling / 2, ceiling)


class CallbackTask(Task):
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None
    ignore_result = True


_session: requests.Session | None = None


def _http() -> requests.Session:
    global _session
    if _session is None:
        s = requests.Session()
        s.trust_env = False  # no proxy from the environment: the allow-list is the only way out
        s.headers["User-Agent"] = USER_AGENT
        _session = s
    return _session


@app.task(bind=True, base=CallbackTask, name=TASK_DELIVER_CALLBACK, queue=QUEUE_CALLBACKS)
def deliver_callback(
    self: Task, kind: str, id: str, event_id: str, first_at: float | None = None, attempt: int = 0
) -> None:
    if kind not in ("job", "batch") or not is_job_id(id) or not isinstance(event_id, str):
        log.warning("callback dropped: malformed message (kind=%r)", str(kind)[:20])
        raise Ignore()
    rt = runtime()
    first_at = first_at or time.time()
    event, target = _event(rt, kind, id, event_id)
    if event is None:
        log.warning("callback %s %s dropped: its record expired", kind, id)
        raise Ignore()
    delivered, why = _deliver(rt, self.app, event, target)
    if delivered:
        _note(rt, kind, id, callback_state="delivered", callback_attempts=attempt + 1)
        log.info(
            "callback kind=%s id=%s event=%s outcome=delivered attempt=%d", kind, id, event_id, attempt + 1
        )
        return
    if why.startswith("refused:") or time.time() - first_at > rt.settings.callback_max_age:
        _note(rt, kind, id, callback_state="failed", callback_attempts=attempt + 1, callback_error=why)
        log.warning(
            "callback kind=%s id=%s outcome=failed after %d attempt(s): %s", kind, id, attempt + 1, why
        )
        raise Ignore()
    countdown = backoff(attempt, rt.settings.callback_retry_base)
    _note(rt, kind, id, callback_state="retrying", callback_attempts=attempt + 1, callback_error=why)
    log.info("callback kind=%s id=%s outcome=retry in %.1fs: %s", kind, id, countdown, why)
    kwargs = {"kind": kind, "id": id, "event_id": event_id, "first_at": first_at, "attempt": attempt + 1}
    raise self.retry(kwargs=kwargs, countdown=countdown, max_retries=None)


def _event(rt: Runtime, kind: str, ident: str, event_id: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The event body and where it goes (callback_url, on_done, signer)."""
    if kind == "job":
        raw_record = rt.store.get(ident)
        if raw_record is None:
            return None, {}
        record = JobRecord.decode(raw_record, ident)
        job = record.job().to_json()
        target = {
            Field.CALLBACK_URL.value: record.callback_url or "",
            Field.ON_DONE.value: record.on_done or "",
            Field.SIGNER.value: record.signer or "",
        }
        return {"id": event_id, "type": f"job.{job['state']}", "timestamp": time.time(), "data": job}, target
    raw = rt.redis.hgetall(batch_key(ident))
    if not raw:
        return None, {}
    info = {as_str(k): as_str(v) for k, v in raw.items()}
    from producers.batches import BatchStore

    page = BatchStore(rt.redis, rt.store).page(ident, 0, 1)
    data = page.to_json() if page else {}
    data.pop("jobs", None)
    data.pop("next_cursor", None)
    target = {"callback_url": info.get("callback_url", ""), "on_done": "", "signer": info.get("signer", "")}
    return {"id": event_id, "type": "batch.ended", "timestamp": time.time(), "data": data}, target


def _deliver(rt: Runtime, celery_app: Any, event: dict[str, Any], target: dict[str, str]) -> tuple[bool, str]:
    """(delivered, why not); `refused:` reasons are not retried."""
    if target.get("on_done"):
        name, _, queue = target["on_done"].partition("@")
        try:
            celery_app.send_task(name, args=[event["data"]], queue=queue or "celery")
        except Exception as exc:
            return False, f"on_done {name}: could not publish ({type(exc).__name__})"
        if not target.get("callback_url"):
            return True, ""
    url = target.get("callback_url") or ""
    if not url:
        return True, ""
    refused = callback_refused(url, rt.settings.shared.callback_hosts)
    if refused:
        return False, f"refused: {refused}"
    where = parse_http_url(url).hostport
    secret = _secret(rt, target.get("signer", ""))
    if secret is None:
        return False, "refused: the API token that signs this callback was revoked"
    body = json.dumps(event, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": event["id"],
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, event["id"], timestamp, body),
    }
    try:
        resp = _http().post(
            url,
            data=body,
            headers=headers,
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            allow_redirects=False,
            stream=True,
        )
        resp.close()  # the answer's body is of no use
    except requests.RequestException as exc:
        return False, f"{where}: {type(exc).__name__}"
    if 200 <= resp.status_code < 300:
        return True, ""
    return False, f"{where}: HTTP {resp.status_code}"


def _secret(rt: Runtime, signer: str) -> str | None:
    sealed = ApiTokens(rt.redis).sealed_callback_secret(signer) if signer else None
    if sealed is None:
        return None
    box = rt.connection_settings.box
    if box is None:
        from producers.config import ConfigError

        raise ConfigError("AWORK_SECRETS_KEY: not set on this worker, so it cannot sign callbacks")
    return str(box.open(sealed)["callback_secret"])


def _note(rt: Runtime, kind: str, ident: str, **fields: object) -> None:
    """The delivery's state, in the job record or the batch hash (best effort)."""
    try:
        if kind == "job":
            rt.store.update(ident, **fields)
        else:
            rt.redis.hset(batch_key(ident), mapping={k: str(v) for k, v in fields.items()})
    except Exception:
        log.debug("could not note the callback state", exc_info=True)
