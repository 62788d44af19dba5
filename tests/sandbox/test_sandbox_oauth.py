"""The sandbox's OAuth endpoints behave like awork's: PKCE authorization code, HTTP Basic client
auth, rotating single-use refresh tokens, access-token lifetime, revocation, one workspace per
grant."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from ops.sandbox.launcher import SandboxProcess

CLIENT, SECRET = "uploads-client", "client-secret-" + secrets.token_hex(4)
REDIRECT = "https://app.example/callback"


@pytest.fixture(scope="module")
def osb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    proc = SandboxProcess(
        api_keys={"k": "default"},
        admin_token="adm",
        data_dir=tmp_path_factory.mktemp("oauth-sandbox"),
        extra_args=["--oauth-client", f"{CLIENT}:{SECRET}", "--oauth-access-lifetime", "3600"],
    )
    proc.start()
    yield proc
    proc.stop()


def _pkce() -> tuple[str, str]:
    v = secrets.token_urlsafe(48)
    return v, base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b"=").decode()


def _authorize(osb: SandboxProcess, challenge: str, workspace: str | None = None) -> str:
    q = {
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "scope": "full_access offline_access",
        "state": "st-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if workspace:
        q["workspace"] = workspace
    r = requests.get(f"{osb.api_url}/accounts/authorize", params=q, allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    loc = urlsplit(r.headers["Location"])
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == REDIRECT
    params = parse_qs(loc.query)
    assert params["state"] == ["st-1"]
    return params["code"][0]


def _token(osb: SandboxProcess, form: dict[str, str], secret: str = SECRET) -> requests.Response:
    return requests.post(f"{osb.api_url}/accounts/token", data=form, auth=(CLIENT, secret), timeout=10)


def _grant(osb: SandboxProcess, workspace: str) -> dict[str, str]:
    verifier, challenge = _pkce()
    code = _authorize(osb, challenge, workspace)
    r = _token(
        osb,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def _me(osb: SandboxProcess, token: str) -> requests.Response:
    return requests.get(f"{osb.api_url}/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_code_flow_with_pkce(osb: SandboxProcess) -> None:
    verifier, challenge = _pkce()
    code = _authorize(osb, challenge, "ws-pkce")
    bad = _token(
        osb,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": "wrong",
        },
    )
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    # a code is single-use: the failed attempt spent it
    again = _token(
        osb,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
    )
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    tokens = _grant(osb, "ws-pkce")
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 3600
    assert _me(osb, tokens["access_token"]).json()["workspace"] == "ws-pkce"
    assert (
        _token(
            osb, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, secret="nope"
        ).status_code
        == 401
    )


def test_refresh_tokens_rotate_and_are_single_use(osb: SandboxProcess) -> None:
    tokens = _grant(osb, "ws-rot")
    r1 = _token(osb, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    assert r1.status_code == 200
    new = r1.json()
    assert new["refresh_token"] != tokens["refresh_token"]
    reuse = _token(osb, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert (
        _token(osb, {"grant_type": "refresh_token", "refresh_token": new["refresh_token"]}).status_code == 200
    )


def test_lifetime_revocation_and_own_workspace(osb: SandboxProcess) -> None:
    osb.set_oauth_lifetime(1)
    try:
        tokens = _grant(osb, "ws-rev")
        assert _me(osb, tokens["access_token"]).status_code == 200
        # entities of another workspace stay invisible to this grant
        other = osb.seed("tasks", str(uuid.uuid4()), workspace="someone-else")
        r = requests.get(
            f"{osb.api_url}/tasks/{other}/files",
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
            timeout=10,
        )
        assert r.status_code == 404
        time.sleep(1.2)
        assert _me(osb, tokens["access_token"]).status_code == 401  # lapsed
        fresh = _token(osb, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}).json()
        assert _me(osb, fresh["access_token"]).status_code == 200
    finally:
        osb.set_oauth_lifetime(3600)
    fresh = _token(osb, {"grant_type": "refresh_token", "refresh_token": fresh["refresh_token"]}).json()
    assert osb.revoke_grants("ws-rev") == 1
    assert _me(osb, fresh["access_token"]).status_code == 401
    r = _token(osb, {"grant_type": "refresh_token", "refresh_token": fresh["refresh_token"]})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert osb.oauth_stats()["invalid_grant"] >= 1


def test_worker_oauth_client_against_the_sandbox(osb: SandboxProcess, tmp_path: Path) -> None:
    from workers.connections.oauth import InvalidGrant, OAuthClient
    from workers.settings import Secret

    client = OAuthClient(CLIENT, Secret(SECRET), osb.api_url)
    tokens = _grant(osb, "ws-client")
    ts = client.refresh(Secret(tokens["refresh_token"]))
    assert ts.expires_in == 3600 and _me(osb, ts.access_token.reveal()).status_code == 200
    with pytest.raises(InvalidGrant):
        client.refresh(Secret(tokens["refresh_token"]))


def test_client_secret_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token endpoint checks the client secret the way API keys are checked: a wrong secret
    goes through hmac.compare_digest (no early exit on the first differing character), and a
    right secret with non-ASCII characters is accepted, not a 500."""
    import hmac

    from ops.sandbox.oauth import OAuthError, OAuthServer

    server = OAuthServer({"cid": "s\u00e9cret"})
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(bytes(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    body = b"grant_type=refresh_token&refresh_token=nothing"

    def basic(secret: str) -> str:
        return "Basic " + base64.b64encode(f"cid:{secret}".encode()).decode()

    with pytest.raises(OAuthError) as wrong:
        server.token(basic("x\u00e9cret"), body)
    assert wrong.value.error == "invalid_client"
    assert compared == ["x\u00e9cret".encode()]
    with pytest.raises(OAuthError) as right:
        server.token(basic("s\u00e9cret"), body)
    assert right.value.error == "invalid_grant"  # the client passed; the refresh token did not
