"""What the sandbox serves under /api/v1 is in awork's contract, and its bodies fit it."""

from __future__ import annotations

from typing import Any

from ops.sandbox.app import build_router
from ops.sandbox.errors import awork_error_body

from .conftest import Api


def test_every_served_route_exists_in_the_contract(contract: dict[str, Any]) -> None:
    paths = contract["paths"]
    router = build_router()
    assert len(router.routes) > 20
    for route in router.routes:
        assert route.path in paths, f"{route.method} {route.path} is not in the contract"
        assert route.method.lower() in paths[route.path], (
            f"{route.method} {route.path}: the contract has only {sorted(paths[route.path])}"
        )


def test_the_pipeline_routes_are_all_served(contract: dict[str, Any]) -> None:
    served = {(r.method, r.path) for r in build_router().routes}
    wanted = {("POST", "/files/generateuploadurl"),
              ("POST", "/files/images/{entityName}/{entityId}/byuploadid"),
              ("POST", "/files/images/{entityName}/{entityId}"),
              ("GET", "/files/{fileId}/download")}
    for path, ops in contract["paths"].items():
        if path.endswith("/files/byuploadid") or (path.endswith("/files") and "post" in ops):
            wanted.add(("POST", path))
        if path.endswith("/files") and "get" in ops:
            wanted.add(("GET", path))
    assert wanted <= served, sorted(wanted - served)


def _props(contract: dict[str, Any], schema: str) -> set[str]:
    return set(contract["components"]["schemas"][schema]["properties"])


def test_bodies_match_the_schemas(api: Api, contract: dict[str, Any]) -> None:
    g = api.generate()
    assert set(g) == _props(contract, "GenerateUploadUrlResponseModel")
    task = api.sb.seed("tasks")
    api.put(g["uploadURL"], b"x")
    info = api.link("tasks", task, g["uploadId"]).json()
    assert set(info) == _props(contract, "FileInfo")
    assert set(info["fileVersions"][0]) == _props(contract, "FileVersion")
    import json

    err = json.loads(awork_error_body("not-found", "desc", "t", ["d"], [("p", "m")]))
    assert set(err) == _props(contract, "ErrorResponse")
    assert set(err["validationErrors"][0]) == _props(contract, "ValidationErrorResponse")
    required = contract["components"]["schemas"]["UploadByUploadIdForm"]["required"]
    assert set(required) == {"uploadId", "fileName"}
