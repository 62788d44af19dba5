"""`awork-uploads api-tokens`: a token and its callback secret shown once; Redis keeps a hash and
ciphertext only; list shows no secret; revoke ends it."""

from __future__ import annotations

import json

import pytest
import redis
from cryptography.fernet import Fernet

from ops.cli import main as cli_main
from producers.api_tokens import ApiTokens


def test_create_list_revoke(
    producer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AWORK_SECRETS_KEY", raising=False)
    assert cli_main(["api-tokens", "create", "shop", "--workspace", "default"]) == 2
    assert "AWORK_SECRETS_KEY" in capsys.readouterr().err
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("AWORK_SECRETS_KEY", key)
    assert (
        cli_main(["api-tokens", "create", "shop", "--workspace", "default", "--workspace", "acme", "--json"])
        == 0
    )
    made = json.loads(capsys.readouterr().out)
    token, secret = made["token"], made["callback_secret"]
    assert token.startswith("awu_") and secret.startswith("whsec_")
    client = redis.Redis.from_url(producer_env["REDIS_URL"])
    stored = b" ".join(v for k in client.keys("awork:api-token:*") for v in client.hgetall(k).values())
    assert token.encode() not in stored and token.split("_", 2)[2].encode() not in stored
    assert secret.encode() not in stored
    sealed = ApiTokens(client).sealed_callback_secret(made["id"])
    assert sealed and json.loads(Fernet(key.encode()).decrypt(sealed.encode()))["callback_secret"] == secret
    auth = ApiTokens(client).authenticate(token)
    assert auth is not None and auth.token.workspaces == ("default", "acme") and not auth.over_rate
    assert ApiTokens(client).authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert cli_main(["api-tokens", "list", "--json"]) == 0
    listed = capsys.readouterr().out
    assert made["id"] in listed and token not in listed and secret not in listed
    assert cli_main(["api-tokens", "create", "bad name!", "--workspace", "default"]) == 2
    assert "name:" in capsys.readouterr().err
    assert cli_main(["api-tokens", "create", "nows"]) == 2
    assert "workspace:" in capsys.readouterr().err
    assert cli_main(["api-tokens", "revoke", "shop"]) == 0
    assert ApiTokens(client).authenticate(token) is None
    assert cli_main(["api-tokens", "revoke", "shop"]) == 1
    client.close()
