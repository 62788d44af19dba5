"""Pre-built task messages: Celery builds the message of a canvas shape once, we fill it per job.

Publishing a chain through Celery costs a few hundred microseconds of Python per job (signature
objects, freezing, option merging, kombu's envelope), several times the Redis work it causes.
So `Templates` lets Celery build one message per canvas shape (three steps, or the multipart
step) for marker values, on an in-memory kombu transport, and keeps it as text split at the
places that differ between jobs: the job's kwargs (in the body and in `kwargsrepr`), the task
ids (the first step's id, which is also root_id and correlation_id; the ids of the chained
steps) and the delivery tag. Rendering a job's message is then a join of strings.

The message is Celery's protocol 2 as the workers already receive it (tests/test_messages.py
compares it field by field with what Celery itself sends, and a real fleet consumes it). What is
left out: the `task-sent` event per message (Flower shows a task from the worker's
`task-received` on) and the before/after_task_publish signals, which producers do not use.

`publish_rendered` writes the messages with one LPUSH per queue: the layout of kombu's Redis
transport (a list named after the queue, JSON envelopes, priority 0). That is one transport's
internals, so it is used only for redis://, rediss://, unix:// and sentinel:// brokers (kombu's
sentinel transport keeps the same lists, on the current master); RabbitMQ (BROKER_URL) gets
Celery's own publish (`fast_path_supported`).
"""

from __future__ import annotations

import base64
import json
import os
import re
from bisect import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.utils.saferepr import saferepr
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from producers.canvas import job_canvas
from producers.priority import DEFAULT_PRIORITY, Priority
from producers.transport import broker_url, is_amqp

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FIELDS = ("job_id", "workspace", "target", "file_name")
_MARK = "\x1fawork-mark-{}\x1f"  # a control character: no real value can contain it
REPR_MAXSIZE = 1024  # Celery's argsrepr/kwargsrepr size (Task/amqp defaults)


def new_task_ids(count: int) -> list[str]:
    """`count` random UUID4 strings (what Celery's `uuid()` makes), from one urandom call."""
    raw = os.urandom(16 * count).hex()
    out = []
    for i in range(0, 32 * count, 32):
        h = raw[i : i + 32]
        variant = "89ab"[int(h[16], 16) & 3]
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}")
    return out


def _json_text(value: str) -> str:
    """`value` as it sits inside a JSON string (json.dumps' escaping, ensure_ascii)."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return json.dumps(value)[1:-1]


def kwargs_repr(kwargs: Mapping[str, str]) -> str:
    """Celery's `kwargsrepr` header: `saferepr`, which equals `repr` for short printable strings
    without backslashes (what nearly every job has) at a tenth of its cost."""
    d = dict(kwargs)
    if all(v.isprintable() and "\\" not in v for v in d.values()):
        text = repr(d)
        if len(text) < REPR_MAXSIZE - 16:
            return text
    return saferepr(d, REPR_MAXSIZE)


def fast_path_supported(redis_url: str) -> bool:
    """Only kombu's Redis transport is written to directly (through Sentinel too: the same lists,
    on the current master), and only when no BROKER_URL moves the messages to RabbitMQ
    (producers/transport.py)."""
    if is_amqp(broker_url(redis_url)):
        return False
    return redis_url.split("://", 1)[0] in ("redis", "rediss", "unix", "sentinel")


@dataclass(frozen=True)
class Rendered:
    queue: str
    payload: str  # the kombu envelope, as the Redis transport stores it


class _Template:
    """One canvas shape's message, split at the parts that change per job."""

    def __init__(self, app: Celery, three_steps: bool, priority: Priority) -> None:
        marks = {f: _MARK.format(f) for f in _FIELDS}
        envelope, queue = _celery_message(app, three_steps, marks, priority)
        self.queue = queue
        body = base64.b64decode(envelope.pop("body")).decode()
        reply_to = envelope["properties"].get("reply_to", "")
        envelope["headers"]["kwargsrepr"] = _MARK.format("kwargsrepr")
        envelope["body"] = _MARK.format("body")
        head = json.dumps(envelope)
        ids = [u for u in dict.fromkeys(_UUID.findall(head + body)) if u != reply_to]
        self.id_count = len(ids)
        # reply_to is the sending thread's oid (Celery's `thread_oid`): filled in per render
        self.app = app
        escaped = json.dumps(_MARK.format("reply_to"))[1:-1]
        body = body.replace(reply_to, escaped)
        head = head.replace(reply_to, escaped)
        marks["reply_to"] = _MARK.format("reply_to")
        self._body = _as_format(_split(body, marks, ids))
        head_marks = {k: _MARK.format(k) for k in ("kwargsrepr", "body", "reply_to")}
        self._head = _as_format(_split(head, head_marks, ids))

    def render(self, kwargs: Mapping[str, str]) -> str:
        ids = new_task_ids(self.id_count)
        reply_to = self.app.thread_oid
        values = {f: _json_text(kwargs[f]) for f in _FIELDS}
        values["reply_to"] = reply_to
        body = _join(self._body, values, ids)
        values = {
            "kwargsrepr": json.dumps(kwargs_repr(kwargs))[1:-1],
            "body": base64.b64encode(body.encode()).decode(),
            "reply_to": reply_to,
        }
        return _join(self._head, values, ids)


class Templates:
    """The message templates of one producer (built on first use, per canvas shape)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._shapes: dict[tuple[bool, Priority], _Template] = {}

    def render(
        self, three_steps: bool, kwargs: Mapping[str, str], priority: Priority = DEFAULT_PRIORITY
    ) -> Rendered:
        shape = (three_steps, priority)
        template = self._shapes.get(shape)
        if template is None:
            template = self._shapes[shape] = _Template(self.app, three_steps, priority)
        return Rendered(template.queue, template.render(kwargs))


def publish_rendered(
    client: redis.Redis, messages: Sequence[Rendered], record_keys: Sequence[str] = ()
) -> None:
    """LPUSH every message onto its queue (one command per queue) and set `published=1` in the
    jobs' records, all in one MULTI/EXEC: a batch is on the queues, and marked so, whole or not
    at all, in one round trip."""
    by_queue: dict[str, list[str]] = {}
    for m in messages:
        by_queue.setdefault(m.queue, []).append(m.payload)
    pipe = client.pipeline(transaction=True)
    for queue, payloads in by_queue.items():
        pipe.lpush(queue, *payloads)
    for key in record_keys:
        pipe.hset(key, "published", "1")
    pipe.execute()


def _celery_message(
    app: Celery, three_steps: bool, marks: Mapping[str, str], priority: Priority
) -> tuple[dict[str, Any], str]:
    """What Celery publishes for this shape, read back from an in-memory kombu transport, and
    the Redis list kombu's Redis transport would push it to (one list per priority step)."""
    memory = Celery("awork-message-template", set_as_current=False)
    memory.conf.update({k: v for k, v in app.conf.items() if k.startswith(("task_", "accept_"))})
    memory.conf.update(broker_url="memory://", task_send_sent_event=False)
    try:
        sig = job_canvas(memory, three_steps, dict(marks), priority)
        first = sig.tasks[0] if three_steps else sig  # type: ignore[attr-defined]  # a chain's tasks
        queue = first.options["queue"]
        with memory.connection_for_write() as conn:
            with memory.producer_or_acquire() as producer:
                sig.apply_async(producer=producer)
            message = conn.default_channel._get(queue)  # type: ignore[attr-defined]  # kombu's memory transport
    finally:
        memory.close()
    return message, redis_list_key(queue, int(first.options.get("priority") or 0))


PRIORITY_SEP: str = RedisChannel.sep


def redis_list_key(queue: str, priority: int) -> str:
    """The list kombu's Redis transport pushes a message of this priority to (Channel._q_for_pri
    with the default priority_steps and separator)."""
    level = PRIORITY_STEPS[bisect(PRIORITY_STEPS, max(0, min(9, priority))) - 1]
    return f"{queue}{PRIORITY_SEP}{level}" if level else queue


def _split(text: str, marks: Mapping[str, str], ids: Sequence[str]) -> list[str | tuple[str, str] | int]:
    """`text` as literal pieces, ("field", name) for a mark and an index for a task id."""
    lookup: dict[str, str | int] = {json.dumps(m)[1:-1]: name for name, m in marks.items()}
    lookup.update({u: i for i, u in enumerate(ids)})
    if not lookup:
        return [text]
    pattern = re.compile("|".join(re.escape(k) for k in lookup))
    out: list[str | tuple[str, str] | int] = []
    pos = 0
    for m in pattern.finditer(text):
        out.append(text[pos : m.start()])
        found = lookup[m.group(0)]
        out.append(found if isinstance(found, int) else ("field", found))
        pos = m.end()
    out.append(text[pos:])
    return out


def _join(parts: str, values: Mapping[str, str], ids: Sequence[str]) -> str:
    return parts.format_map({**values, **{f"i{n}": v for n, v in enumerate(ids)}})


def _as_format(parts: Sequence[str | tuple[str, str] | int]) -> str:
    """The split text as one str.format template (literal braces doubled): joined in C."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p.replace("{", "{{").replace("}", "}}"))
        elif isinstance(p, int):
            out.append(f"{{i{p}}}")
        else:
            out.append(f"{{{p[1]}}}")
    return "".join(out)
