"""Pre-built task messages (producers.messages) are what Celery itself would have sent."""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

import pytest
import redis
from celery.utils.saferepr import saferepr

from producers.canvas import job_canvas, publisher_app, step_kwargs
from producers.contract import QUEUE_API, QUEUE_TRANSFER
from producers.messages import REPR_MAXSIZE, Templates, kwargs_repr, new_task_ids, publish_rendered
from producers.priority import Priority

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NAMES = ["report.pdf", 'it\'s "quoted".pdf', "é ü 日本.txt", "back\\slash.txt", "tab\there.txt", "x" * 1100]


def _decoded(raw: bytes) -> dict[str, Any]:
    envelope = json.loads(raw)
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    return envelope


def _normalised(message: dict[str, Any]) -> tuple[str, list[str]]:
    """The message with its per-message ids replaced by their order of appearance."""
    text = json.dumps(message, sort_keys=True)
    ids = list(dict.fromkeys(UUID.findall(text)))
    reply_to = message["properties"]["reply_to"]
    for n, found in enumerate(ids):
        if found != reply_to:
            text = text.replace(found, f"<id-{n}>")
    return text, ids


@pytest.mark.parametrize("priority", list(Priority))
@pytest.mark.parametrize("three_steps", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_prebuilt_message_equals_celerys(
    redis_url: str, three_steps: bool, name: str, priority: Priority
) -> None:
    """Field by field what Celery itself sends, on the same Redis list (kombu keeps one list per
    priority step): workers cannot tell the two apart."""
    client = redis.Redis.from_url(redis_url)
    app = publisher_app(redis_url)
    queue = QUEUE_API if three_steps else QUEUE_TRANSFER
    try:
        kwargs = step_kwargs(uuid.uuid4().hex, "default", f"task:{uuid.uuid4()}", name)
        job_canvas(app, three_steps, kwargs, priority).apply_async()
        (celerys_list,) = [k.decode() for k in client.scan_iter(f"{queue}*") if client.type(k) == b"list"]
        (celerys,) = client.lrange(celerys_list, 0, -1)
        client.delete(celerys_list)
        rendered = Templates(app).render(three_steps, kwargs, priority)
        assert rendered.queue == celerys_list
        publish_rendered(client, [rendered])
        (ours,) = client.lrange(celerys_list, 0, -1)
        client.delete(celerys_list)
    finally:
        app.close()
        client.close()
    theirs_msg, ours_msg = _decoded(celerys), _decoded(ours)
    theirs_text, theirs_ids = _normalised(theirs_msg)
    ours_text, ours_ids = _normalised(ours_msg)
    assert ours_text == theirs_text
    same = {ours_msg["properties"]["reply_to"], kwargs["target"].split(":")[1]}  # the thread, the target
    assert len(ours_ids) == len(theirs_ids) and set(ours_ids) & set(theirs_ids) == same  # fresh task ids
    headers, properties = ours_msg["headers"], ours_msg["properties"]
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]


def test_two_renderings_share_no_task_id(redis_url: str) -> None:
    app = publisher_app(redis_url)
    try:
        templates = Templates(app)
        target = str(uuid.uuid4())
        kwargs = step_kwargs(uuid.uuid4().hex, "default", f"task:{target}", "a.pdf")
        a, b = (_decoded(templates.render(True, kwargs).payload.encode()) for _ in range(2))
    finally:
        app.close()
    ids_a, ids_b = (set(UUID.findall(json.dumps(m))) for m in (a, b))
    assert ids_a & ids_b == {a["properties"]["reply_to"], target}
    assert len(ids_a) == 6  # id (= root_id, correlation_id), 2 chained steps, delivery tag, + 2 shared


def test_kwargs_repr_is_celerys_saferepr() -> None:
    for name in NAMES:
        kwargs = step_kwargs("a" * 32, "w", "task:x", name)
        assert kwargs_repr(kwargs) == saferepr(kwargs, REPR_MAXSIZE), name


def test_task_ids_are_uuid4() -> None:
    for text in new_task_ids(500):
        assert str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4
