"""The intake against its own OpenAPI document: the committed copy is current, and a property
test (schemathesis) finds no 500 and no answer that the document does not describe."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ops.redis_server import RedisServer
from producers.config import SharedSettings
from producers.intake.server import openapi_document
from tests.intake_util import Intake, make_token, running_intake

COMMITTED = Path(__file__).resolve().parents[1] / "ops" / "openapi.json"
EXAMPLES = 50  # per operation and mode: the whole test stays well under a minute
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_committed_openapi_is_the_apps() -> None:
    """Regenerate with `awork-uploads api --print-openapi > ops/openapi.json`."""
    assert json.loads(COMMITTED.read_text()) == json.loads(json.dumps(openapi_document()))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Intake, str]]:
    root = tmp_path_factory.mktemp("intake-schema")
    server = RedisServer(root / "redis", appendonly=False).start()
    (root / "staging").mkdir()
    shared = SharedSettings(
        redis_url=server.url,
        staging_dir=root / "staging",
        workspaces_file=None,
        record_ttl_seconds=3600,
        source_url_hosts=("files.example.com",),
    )
    try:
        with running_intake(shared, max_body_bytes=1024 * 1024) as intake:
            yield intake, make_token(server.url, ["default"], rate=100_000).token
    finally:
        server.stop()


def test_api_matches_its_openapi(live: tuple[Intake, str]) -> None:
    """Every operation, schemathesis-generated requests (valid and invalid), bounded in count."""
    from hypothesis import given

    intake, token = live
    schema = schemathesis.openapi.from_dict(json.loads(COMMITTED.read_text()))
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8
    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case: Any) -> None:
            case.call_and_validate(base_url=intake.url, headers=headers, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong in /healthz, /readyz
