"""Fault injection: each kind, per route, reproducible from a seed."""

from __future__ import annotations

import time

import pytest
import requests

from .conftest import PNG, Api, assert_awork_error, azure_code


def _statuses(api: Api, n: int) -> list[int | str]:
    out: list[int | str] = []
    for _ in range(n):
        try:
            out.append(api.request("POST", "/files/generateuploadurl").status_code)
        except requests.ConnectionError:
            out.append("drop")
    return out


def test_faults_replay_from_a_seed(api: Api) -> None:
    faults = {"routes": {"generate": {"500": 0.2, "503": 0.1, "429": 0.1, "drop": 0.1}}}
    api.sb.set_faults({"seed": 42, **faults})
    first = _statuses(api, 40)
    assert {200, 500, 503, 429, "drop"} <= set(first)
    api.sb.set_faults({"seed": 42})  # naming the seed restarts every route's stream
    assert _statuses(api, 40) == first
    api.sb.reset()  # so does a reset
    assert _statuses(api, 40) == first
    api.sb.set_faults({"seed": 43})
    assert _statuses(api, 40) != first
    injected = api.sb.stats()["faults_injected"]
    assert injected["500"] > 0 and injected["drop"] > 0


def test_fault_responses_are_awork_errors(api: Api) -> None:
    for kind, status, code in (("500", 500, "server-error"), ("503", 503, "service-unavailable"),
                               ("429", 429, "too-many-requests")):
        api.sb.set_faults({"routes": {"generate": {kind: 1.0}}})
        r = api.request("POST", "/files/generateuploadurl")
        assert_awork_error(r, status, code)
        if kind == "429":  # a 429 storm looks like the real thing
            assert r.headers["RateLimit-Remaining"] == "0"
            assert r.headers["RateLimit-Reset"] == "1"
            assert r.headers["X-RateLimit-Remaining-Second"] == "0"
        api.sb.set_faults({"routes": {"generate": None}})
    assert api.sb.stats()["faults_injected"] | {} == {
        "500": 1, "503": 1, "429": 1, "drop": 0, "drop_after": 0, "500_after": 0, "stall_after": 0,
        "latency": 0}
    # an injected 429 is not a real one
    assert api.sb.stats()["rate_limited"] == 0


def test_star_route_and_route_override(api: Api) -> None:
    api.sb.set_faults({"routes": {"*": {"503": 1.0}, "generate": {"503": 0.0}}})
    g = api.generate()
    r = api.put(g["uploadURL"], b"x")
    assert r.status_code == 503 and azure_code(r) == "ServerBusy"
    task = api.sb.seed("tasks")
    assert_awork_error(api.link("tasks", task, g["uploadId"]), 503, "service-unavailable")


def test_drop_before_the_work(api: Api) -> None:
    api.sb.set_faults({"routes": {"generate": {"drop": 1.0}}})
    with pytest.raises(requests.ConnectionError):
        api.request("POST", "/files/generateuploadurl")
    stats = api.sb.stats()
    assert stats["uploads"] == {} and stats["faults_injected"]["drop"] == 1


def test_drop_after_the_link_is_the_worst_case(api: Api) -> None:
    task = api.sb.seed("tasks")
    upload_id = api.upload(b"linked but unanswered")
    api.sb.set_faults({"routes": {"link": {"drop_after": 1.0}}})
    with pytest.raises(requests.ConnectionError):
        api.link("tasks", task, upload_id)
    api.sb.set_faults({"routes": {"link": None}})
    assert api.sb.stats()["links"][upload_id] == 1
    # the retry a worker would make
    assert_awork_error(api.link("tasks", task, upload_id), 400, "duplication-violation")
    listed = api.request("GET", f"/tasks/{task}/files").json()
    assert [f["fileName"] for f in listed] == ["f.bin"]


def test_500_after_the_work(api: Api) -> None:
    task = api.sb.seed("tasks")
    upload_id = api.upload(b"done, said no")
    api.sb.set_faults({"routes": {"link": {"500_after": 1.0}}})
    assert_awork_error(api.link("tasks", task, upload_id), 500, "server-error")
    assert api.sb.stats()["links"][upload_id] == 1


def test_drop_in_the_middle_of_a_put_body(api: Api) -> None:
    g = api.generate()
    api.sb.set_faults({"routes": {"blob": {"drop": 1.0}}})
    with pytest.raises(requests.ConnectionError):
        api.put(g["uploadURL"], b"z" * (8 << 20))
    stats = api.sb.stats()
    assert not stats["uploads"][g["uploadId"]]["committed"]
    assert stats["faults_injected"]["drop"] == 1
    assert stats["bytes_received"] == 0
    api.sb.set_faults({"routes": {"blob": {"drop": 0}}})
    assert api.put(g["uploadURL"], b"z" * (8 << 20)).status_code == 201


def test_drop_in_the_middle_of_a_multipart_body(api: Api) -> None:
    user = api.sb.seed("users")
    api.sb.set_faults({"routes": {"multipart": {"drop": 1.0}}})
    with pytest.raises(requests.ConnectionError):
        api.request("POST", f"/users/{user}/files", files={"File": ("a.bin", b"q" * (4 << 20))})
    with pytest.raises(requests.ConnectionError):
        api.request("POST", f"/files/images/users/{user}", files={"File": ("a.png", PNG)})
    assert api.sb.stats()["files"] == []


def test_blob_faults_speak_azure(api: Api) -> None:
    g = api.generate()
    for kind, status, code in (("500", 500, "InternalError"), ("503", 503, "ServerBusy")):
        api.sb.set_faults({"routes": {"blob": None}})
        api.sb.set_faults({"routes": {"blob": {kind: 1.0}}})
        r = api.put(g["uploadURL"], b"x")
        assert r.status_code == status and azure_code(r) == code


def test_latency_and_jitter(api: Api) -> None:
    api.sb.set_faults({"latency_ms": 150, "jitter_ms": 50})
    t = time.monotonic()
    api.generate()
    elapsed = time.monotonic() - t
    assert 0.15 <= elapsed < 1.0
    api.sb.set_faults({"latency_ms": 0, "jitter_ms": 0,
                       "routes": {"list": {"latency_ms": 200}}})
    t = time.monotonic()
    api.generate()
    assert time.monotonic() - t < 0.15
    task = api.sb.seed("tasks")
    t = time.monotonic()
    api.request("GET", f"/tasks/{task}/files")
    assert time.monotonic() - t >= 0.2
    assert api.sb.stats()["faults_injected"]["latency"] == 2


def test_window_paces_blob_bodies_by_the_round_trip(api: Api) -> None:
    """A window per round trip is what latency does to one TCP stream: bodies slow down too."""
    body = bytes(1024 * 1024)  # 1 MiB
    api.sb.set_faults({"routes": {"blob": {"latency_ms": 100}}, "window_kib": 128})
    try:
        g = api.generate()
        t = time.monotonic()
        r = api.put(g["uploadURL"], body)
        paced = time.monotonic() - t
        assert r.status_code == 201, r.text
        # 1 MiB at 128 KiB per 100 ms is 0.8 s, less what the socket buffers take at once
        assert paced >= 0.5, paced
        api.sb.set_faults({"window_kib": 0})
        g = api.generate()
        t = time.monotonic()
        assert api.put(g["uploadURL"], body).status_code == 201
        assert time.monotonic() - t < paced
    finally:
        api.sb.set_faults({"routes": {"blob": None}, "window_kib": 0})


@pytest.mark.parametrize("body", [
    {"window_kib": -1},
    {"routes": {"nope": {"500": 0.1}}},
    {"routes": {"link": {"404": 0.1}}},
    {"routes": {"link": {"500": 1.5}}},
    {"routes": {"link": {"500": 0.6, "503": 0.6}}},
    {"latency_ms": -1},
    {"rate_limits": {"per_second": 0}},
    {"upload_url_permissions": "x"},
    {"no_such_setting": 1},
])
def test_bad_fault_settings_are_refused(api: Api, body: dict[str, object]) -> None:
    r = requests.post(api.sb.admin_url + "/faults", json=body,
                      headers={"Authorization": "Bearer admin-token"}, timeout=10)
    assert r.status_code == 400 and "error" in r.json()


def test_partial_fault_bodies_change_only_what_they_name(api: Api) -> None:
    api.sb.set_faults({"routes": {"link": {"500": 0.1, "drop": 0.2}}, "latency_ms": 5})
    now = api.sb.set_faults({"routes": {"link": {"500": 0.3}}})
    assert now["routes"]["link"] == {"500": 0.3, "drop": 0.2}
    assert now["latency_ms"] == 5
    now = api.sb.set_faults({"rate_limits": {"workspaces": {"ws-b": {"per_second": 2}}}})
    assert now["rate_limits"]["workspaces"]["ws-b"] == {"per_minute": 1000000, "per_second": 2}
    assert api.sb.faults() == now
