"""Worker metrics: the API, the endpoint and its port policy, queue depth from a real Redis,
real workers serving on consecutive ports, and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from kombu import Connection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops.processes import Child, stop_all
from ops.rabbitmq import Vhost, close_connections
from ops.redis_server import free_port
from producers.config import ConfigError
from producers.contract import QUEUE_API, QUEUE_TRANSFER, TASK_GENERATE_UPLOAD_URL, TASK_PUT_FILE
from producers.keys import DEAD_KEY
from tests.fleet import wait_until
from workers import metrics, metrics_server, queue_metrics
from workers.errors import PermanentError, RateLimited, TransientError, UploadUrlExpired

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "ops" / "grafana-dashboard.json"


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name -> {sorted labels (plus the sample suffix): value}."""
    text = requests.get(url, timeout=5).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for sample in family.samples:
            key = (("__name__", sample.name), *sorted(sample.labels.items()))
            samples[key] = sample.value
    return out


def value(families: dict, name: str, sample: str, **labels: str) -> float:
    key = (("__name__", sample), *sorted(labels.items()))
    return families[name][key]


@pytest.fixture
def metrics_off() -> Iterator[None]:
    metrics_server.stop_metrics_server()
    yield
    metrics_server.stop_metrics_server()


def publisher(redis_url: str):  # type: ignore[no-untyped-def]
    from producers.canvas import publisher_app

    return publisher_app(redis_url)


# -- the API and the endpoint -------------------------------------------------------------------
def test_every_metric_family_is_served_after_the_api_is_called(redis_url: str, metrics_off: None) -> None:
    port = free_port()
    bound = metrics_server.start_metrics_server(
        environ={"WORKER_METRICS_PORT": str(port), "WORKER_METRICS_ADDR": "127.0.0.1"}, redis_url=redis_url
    )
    assert bound == port
    ws = f"ws-{uuid.uuid4().hex[:6]}"
    metrics.step_finished("generate", ws, "ok", 0.2)
    metrics.step_finished("put", ws, "retry", 3.0)
    metrics.job_finished("done", ws)
    metrics.job_finished("failed", ws)
    metrics.retry("put", metrics.retry_reason(TransientError("boom", status=503)))
    metrics.rate_limited(ws)
    metrics.rate_wait(ws, 1.5)
    metrics.bytes_uploaded(ws, 1000)
    metrics.bytes_uploaded(ws, 24)
    redis.Redis.from_url(redis_url).rpush(QUEUE_TRANSFER, b"{}")

    families = scrape(f"http://127.0.0.1:{bound}/metrics")
    missing = [name for name in metrics.FAMILIES if name not in families]
    assert not missing, f"not served: {missing}"
    assert all(name.startswith("awork_uploads_") for name in metrics.FAMILIES)

    p = "awork_uploads_"
    assert value(families, f"{p}bytes_uploaded", f"{p}bytes_uploaded_total", workspace=ws) == 1024
    assert value(families, f"{p}jobs_finished", f"{p}jobs_finished_total", state="done", workspace=ws) == 1
    assert value(families, f"{p}rate_limited", f"{p}rate_limited_total", workspace=ws) == 1
    assert value(families, f"{p}rate_wait_seconds", f"{p}rate_wait_seconds_sum", workspace=ws) == 1.5
    assert value(families, f"{p}rate_wait_seconds", f"{p}rate_wait_seconds_count", workspace=ws) == 1
    assert value(families, f"{p}steps", f"{p}steps_total", step="put", workspace=ws, outcome="retry") == 1
    assert value(families, f"{p}retries", f"{p}retries_total", step="put", reason="http_5xx") >= 1
    assert (
        value(families, f"{p}step_duration_seconds", f"{p}step_duration_seconds_bucket",
              step="generate", outcome="ok", le="0.25")
        >= 1
    )  # fmt: skip
    assert value(families, f"{p}queue_depth", f"{p}queue_depth", queue=QUEUE_TRANSFER) == 1
    assert value(families, f"{p}queue_depth", f"{p}queue_depth", queue=QUEUE_API) == 0
    assert value(families, f"{p}broker_up", f"{p}broker_up") == 1

    # once per process: a second start returns the port already bound
    again = metrics_server.start_metrics_server(
        environ={"WORKER_METRICS_PORT": str(free_port()), "WORKER_METRICS_ADDR": "127.0.0.1"},
        redis_url=redis_url,
    )
    assert again == bound


def test_off_when_the_port_is_unset_and_a_bad_port_names_the_variable(metrics_off: None) -> None:
    assert metrics_server.start_metrics_server(environ={}) is None
    assert metrics_server.start_metrics_server(environ={"WORKER_METRICS_PORT": "  "}) is None
    with pytest.raises(ConfigError, match="WORKER_METRICS_PORT"):
        metrics_server.start_metrics_server(environ={"WORKER_METRICS_PORT": "metrics"})
    with pytest.raises(ConfigError, match="WORKER_METRICS_PORT"):
        metrics_server.parse_port("70000")


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_taken_port_moves_to_the_next_free_one(metrics_off: None) -> None:
    base = free_port()
    taken = _listening(base)
    try:
        port = metrics_server.start_metrics_server(
            environ={"WORKER_METRICS_PORT": str(base), "WORKER_METRICS_ADDR": "127.0.0.1"},
            redis_url="redis://127.0.0.1:1/0",
        )
        assert port is not None and base < port < base + metrics_server.PORT_TRIES
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    finally:
        taken.close()


def test_a_full_port_range_leaves_the_worker_running_without_metrics(
    metrics_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = free_port()
    socks = []
    try:
        for offset in range(3):
            try:
                socks.append(_listening(base + offset))
            except OSError:
                pytest.skip("could not occupy three consecutive ports")
        with pytest.raises(OSError):
            metrics_server.bind_first_free(base, "127.0.0.1", CollectorRegistry(), tries=3)
        monkeypatch.setattr(metrics_server, "PORT_TRIES", 3)
        env = {"WORKER_METRICS_PORT": str(base), "WORKER_METRICS_ADDR": "127.0.0.1"}
        assert metrics_server.start_metrics_server(environ=env, redis_url="redis://127.0.0.1:1/0") is None
    finally:
        for s in socks:
            s.close()


def test_retry_reasons_form_a_closed_set() -> None:
    cases: list[tuple[BaseException, str]] = [
        (RateLimited("slow down", status=429), "http_429"),
        (TransientError("bad gateway", status=502), "http_5xx"),
        (TransientError("conflict", status=409), "http_4xx"),
        (UploadUrlExpired("se passed", status=403), "url_expired"),
        (TransientError("ReadTimeout: read timed out"), "timeout"),
        (TransientError("ConnectionError: reset by peer"), "connection"),
        (ConnectionResetError("reset"), "connection"),
        (PermanentError("nope"), "other"),
        (ValueError("odd"), "other"),
    ]
    for exc, reason in cases:
        assert metrics.retry_reason(exc) == reason, exc
        assert reason in metrics.RETRY_REASONS


# -- queue depth from Redis ---------------------------------------------------------------------
def test_queue_depth_counts_kombu_priority_sub_queues(redis_url: str) -> None:
    app = publisher(redis_url)
    kwargs = {"job_id": "j", "workspace": "default", "target": "task:x", "file_name": "a.txt"}
    try:
        with app.connection_for_write() as conn:
            for priority in (None, 0, 4, 9):
                app.send_task(TASK_GENERATE_UPLOAD_URL, kwargs=kwargs, queue=QUEUE_API,
                              priority=priority, connection=conn)  # fmt: skip
            app.send_task(TASK_PUT_FILE, kwargs=kwargs, queue=QUEUE_TRANSFER, priority=6, connection=conn)
    finally:
        app.close()
    client = redis.Redis.from_url(redis_url)
    api_lists = {k.decode() for k in client.keys(f"{QUEUE_API}*")}
    assert len(api_lists) > 1, "expected priority sub-queues next to the plain list"
    layout = queue_metrics.BrokerLayout()
    assert api_lists <= set(layout.list_keys(QUEUE_API))

    client.hset("unacked", "tag-1", "{}")
    client.zadd(DEAD_KEY, {"job-a": 1.0, "job-b": 2.0})
    collector = queue_metrics.QueueDepthCollector(redis_url)
    depths, unacked, dead = collector.read()
    assert depths == {QUEUE_API: 4, QUEUE_TRANSFER: 1}
    assert (unacked, dead) == (1, 2)

    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("awork_uploads_queue_depth", {"queue": QUEUE_API}) == 4
    assert registry.get_sample_value("awork_uploads_unacked_messages") == 1
    assert registry.get_sample_value("awork_uploads_dead_letters") == 2
    assert registry.get_sample_value("awork_uploads_broker_up") == 1


def test_a_scrape_survives_an_unreachable_redis() -> None:
    collector = queue_metrics.QueueDepthCollector(f"redis://:secret@127.0.0.1:{free_port()}/0", timeout=0.5)
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("awork_uploads_broker_up") == 0
    assert registry.get_sample_value("awork_uploads_queue_depth", {"queue": QUEUE_API}) is None


def test_layout_follows_the_transport_options() -> None:
    layout = queue_metrics.BrokerLayout.from_transport_options(
        {"global_keyprefix": "p:", "sep": ":", "priority_steps": [0, 5]}, queues=["q"]
    )
    assert layout.list_keys("q") == ["p:q", "p:q:5"]
    default = queue_metrics.BrokerLayout.from_transport_options({})
    assert default.list_keys(QUEUE_API) == [QUEUE_API, f"{QUEUE_API}\x06\x163", f"{QUEUE_API}\x06\x166",
                                            f"{QUEUE_API}\x06\x169"]  # fmt: skip


# -- queue depth from RabbitMQ (BROKER_URL=amqp://...) ------------------------------------------
def amqp_collector(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, broker_url: str, *queues: str
) -> tuple[queue_metrics.QueueDepthCollector, CollectorRegistry]:
    """The collector a worker registers with BROKER_URL set, on a registry of its own."""
    monkeypatch.setenv("BROKER_URL", broker_url)
    registry = CollectorRegistry()
    layout = queue_metrics.BrokerLayout(queues=queues) if queues else None
    collector = metrics_server.register_queue_collector(redis_url, layout, registry)
    return collector, registry


def test_queue_depth_on_rabbitmq_counts_the_messages_ready_in_each_step_queue(
    vhost: Vhost, redis_url: str, monkeypatch: pytest.MonkeyPatch, metrics_off: None
) -> None:
    """RabbitMQ has no kombu lists in Redis: the depth is a passive declare's message count (one
    quorum queue holds every priority), and a queue no worker has declared yet holds 0."""
    absent = f"awork.test.absent-{uuid.uuid4().hex[:6]}"
    collector, registry = amqp_collector(redis_url, monkeypatch, vhost.url, QUEUE_API, QUEUE_TRANSFER, absent)
    app = publisher(redis_url)
    kwargs = {"job_id": "j", "workspace": "default", "target": "task:x", "file_name": "a.txt"}
    try:
        with app.connection_for_write() as conn:
            for priority in (None, 0, 4, 9, 9):
                app.send_task(TASK_GENERATE_UPLOAD_URL, kwargs=kwargs, queue=QUEUE_API,
                              priority=priority, connection=conn)  # fmt: skip
            app.send_task(TASK_PUT_FILE, kwargs=kwargs, queue=QUEUE_TRANSFER, connection=conn)
        redis.Redis.from_url(redis_url).zadd(DEAD_KEY, {"job-a": 1.0, "job-b": 2.0})

        def depth(queue: str) -> float | None:
            return registry.get_sample_value("awork_uploads_queue_depth", {"queue": queue})

        wait_until(lambda: depth(QUEUE_API) == 5, 10, "5 messages ready in awork.api")
        assert collector.amqp is not None
        kept = collector.amqp._conn
        assert (depth(QUEUE_TRANSFER), depth(absent)) == (1, 0)
        assert registry.get_sample_value("awork_uploads_broker_up") == 1
        assert registry.get_sample_value("awork_uploads_dead_letters") == 2  # a Redis key still
        assert registry.get_sample_value("awork_uploads_unacked_messages") is None  # AMQP cannot tell
        assert collector.amqp._conn is kept  # one connection across scrapes
        assert not redis.Redis.from_url(redis_url).keys(f"{QUEUE_API}*")  # nothing read from Redis lists
    finally:
        app.close()
        with Connection(vhost.url) as conn:
            for queue in (QUEUE_API, QUEUE_TRANSFER):
                conn.default_channel.queue_purge(queue)


def test_a_connection_the_broker_closed_is_replaced_within_the_scrape(
    vhost: Vhost, redis_url: str, monkeypatch: pytest.MonkeyPatch, metrics_off: None
) -> None:
    """After a broker restart the kept connection is dead: the scrape reads on a fresh one."""
    collector, registry = amqp_collector(redis_url, monkeypatch, vhost.url)
    assert registry.get_sample_value("awork_uploads_broker_up") == 1
    assert collector.amqp is not None
    kept = collector.amqp._conn
    assert close_connections(vhost.name) >= 1
    assert registry.get_sample_value("awork_uploads_broker_up") == 1
    assert collector.amqp._conn is not None and collector.amqp._conn is not kept


def test_a_scrape_survives_an_unreachable_rabbitmq(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, metrics_off: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens: broker_up 0 at once (one attempt, not kombu's retry after a 2 s sleep),
    the dead letters still from Redis, and the URL's password nowhere."""
    url = f"amqp://guest:s3cret-pw@127.0.0.1:{free_port()}/awork"
    _, registry = amqp_collector(redis_url, monkeypatch, url)
    for _ in range(2):
        started = time.monotonic()
        assert registry.get_sample_value("awork_uploads_broker_up") == 0
        assert time.monotonic() - started < 1.5
    assert registry.get_sample_value("awork_uploads_queue_depth", {"queue": QUEUE_API}) is None
    assert registry.get_sample_value("awork_uploads_dead_letters") == 0
    assert "s3cret-pw" not in caplog.text + generate_latest(registry).decode()
    assert "cannot read queue depth from RabbitMQ" in caplog.text


def test_a_scrape_returns_within_the_timeout_when_rabbitmq_never_answers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that takes the TCP connection and says nothing: each scrape ends after `timeout`,
    also while the earlier scrape's read is still waiting."""
    silent = _listening(free_port())  # the kernel accepts; nobody ever answers
    try:
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/awork"
        collector = queue_metrics.QueueDepthCollector(redis_url, timeout=0.5, broker_url=url)
        registry = CollectorRegistry()
        registry.register(collector)
        for _ in range(3):
            started = time.monotonic()
            assert registry.get_sample_value("awork_uploads_broker_up") == 0
            assert time.monotonic() - started < 1.5
        assert registry.get_sample_value("awork_uploads_dead_letters") == 0
        collector.close()
    finally:
        silent.close()


# -- real workers ---------------------------------------------------------------------------------
def start_worker(env: dict[str, str], name: str, log: Path) -> Child:
    argv = [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool=threads", "--concurrency=2",
        f"--queues={QUEUE_API},{QUEUE_TRANSFER}", f"--hostname={name}@%h", "--loglevel=INFO",
        "--without-mingle", "--without-gossip",
        # Until the app's include list names them (harmless afterwards).
        "--include=workers.metrics_server,workers.logging_setup",
    ]  # fmt: skip
    return Child(name, argv, env, log).start()


def wait_for_port(log: Path, child: Child, timeout: float = 45.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.search(r"metrics: serving http://[^:]+:(\d+)/metrics", text)
        if found:
            return int(found.group(1))
        if not child.alive():
            break
        time.sleep(0.2)
    raise AssertionError(f"worker did not serve metrics:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
def test_two_workers_on_one_machine_serve_on_consecutive_ports(
    redis_url: str, staging_dir: Path, tmp_path: Path
) -> None:
    base = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": redis_url,
        "STAGING_DIR": str(staging_dir),
        "WORKER_METRICS_PORT": str(base),
        "WORKER_METRICS_ADDR": "127.0.0.1",
    }
    children: list[Child] = []
    try:
        ports = []
        for n in (1, 2):
            log = tmp_path / f"w{n}.log"
            children.append(start_worker(env, f"w{n}", log))
            ports.append(wait_for_port(log, children[-1]))
        # the first takes the configured port, the second the next free one
        assert len(set(ports)) == 2 and all(base <= p < base + metrics_server.PORT_TRIES for p in ports)
        assert base in ports
        for port in ports:
            families = scrape(f"http://127.0.0.1:{port}/metrics")
            assert value(families, "awork_uploads_broker_up", "awork_uploads_broker_up") == 1
            assert (
                value(families, "awork_uploads_queue_depth", "awork_uploads_queue_depth", queue=QUEUE_API)
                == 0
            )
    finally:
        stop_all(children, grace=15)
    assert all(not c.alive() for c in children)


# -- the Grafana dashboard ------------------------------------------------------------------------
def test_the_dashboard_queries_only_metrics_that_exist_and_shows_them_all() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard)
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bawork_uploads_\w+", expr):
            family = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert family in metrics.FAMILIES, f"{name} in {expr!r} is not a metric we export"
            used.add(family)
    assert used == set(metrics.FAMILIES), f"not on the dashboard: {set(metrics.FAMILIES) - used}"
