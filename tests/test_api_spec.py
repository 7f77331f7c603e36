"""pyrovm's own OpenAPI document: served at /openapi.json, every response the API gives conforms to it,
and schemathesis (property-based, a fixed budget) finds no 5xx, no hang and no response off the spec."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import requests_unixsocket
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
    unsupported_method,
)

from pyrovm.api import Client
from pyrovm.api.controller import Controller, openapi_document
from pyrovm.api.server import ApiServer

SPEC = openapi_document()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = ApiServer(tmp_path_factory.mktemp("api") / "api.sock", Controller("spec"))
    srv.start()
    yield srv
    srv.close()


def response_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The spec's schema for that answer (None: no body); AssertionError when the spec has no such answer."""
    for template, item in SPEC["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path) and method.lower() in item:
            responses = item[method.lower()]["responses"]
            assert str(status) in responses, f"{method} {path}: {status} is not in the spec"
            content = responses[str(status)].get("content")
            return None if content is None else content["application/json"]["schema"]
    raise AssertionError(f"{method} {path} is not in the spec")


def check(value: Any, schema: dict[str, Any]) -> None:
    """A small validator for the subset of JSON Schema the document uses."""
    if "$ref" in schema:
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if value is None:
        assert schema.get("nullable"), f"null where {schema} is not nullable"
        return
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}
    if kind is not None:
        assert isinstance(value, types[kind]) and not (kind == "integer" and isinstance(value, bool)), (
            value,
            kind,
        )
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{key} missing in {value}"
        for key, item in value.items():
            if key in props:
                check(item, props[key])
            else:
                assert schema.get("additionalProperties", True) is not False, f"{key} is not in the spec"
    if kind == "array":
        for item in value:
            check(item, schema.get("items", {}))


REQUESTS: list[tuple[str, str, Any]] = [
    ("GET", "/", None),
    ("GET", "/version", None),
    ("GET", "/machine-config", None),
    ("GET", "/vm/config", None),
    ("GET", "/openapi.json", None),
    ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64}),
    ("PATCH", "/machine-config", {"mem_size_mib": 32}),
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 64}),
    ("PUT", "/boot-source", {"kernel_image_path": "/nonexistent", "boot_args": "x"}),
    ("PUT", "/drives/d", {"drive_id": "d", "path_on_host": "/x", "is_root_device": False}),
    ("PUT", "/drives/d", {"drive_id": "e", "path_on_host": "/x", "is_root_device": False}),
    ("PATCH", "/drives/d", {"drive_id": "d", "path_on_host": "/y"}),
    ("PUT", "/network-interfaces/n", {"iface_id": "n", "host_dev_name": "tap0"}),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/never-made.sock"}),
    ("PUT", "/entropy", {}),
    ("PUT", "/metrics", {"metrics_path": "/tmp/never-written"}),
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PUT", "/snapshot/create", {}),
    ("GET", "/balloon", None),
    ("GET", "/vm/config", None),
]


def test_every_response_matches_the_spec(server: ApiServer) -> None:
    with Client(str(server.path)) as c:
        for method, path, body in REQUESTS:
            c._conn.request(method, path, body=None if body is None else json.dumps(body).encode())
            res = c._conn.getresponse()
            raw = res.read()
            schema = response_schema(method, path, res.status)
            if schema is None:
                assert raw == b"", (method, path, raw)
            else:
                check(json.loads(raw), schema)


def test_spec_is_served_and_is_openapi_3(server: ApiServer) -> None:
    assert SPEC["openapi"].startswith("3.") and "/actions" in SPEC["paths"]
    with Client(str(server.path)) as c:
        assert c.get("/openapi.json") == SPEC


SCHEMA = schemathesis.openapi.from_dict(SPEC).exclude(path="/logger")  # (fuzzing log paths would write files)


@pytest.fixture(scope="module")
def base_url(server: ApiServer) -> str:
    return "http://" + urllib.parse.quote_plus(str(server.path))  # the socket path as the host


@SCHEMA.parametrize()
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_nothing(case: schemathesis.Case, base_url: str) -> None:
    with requests.Session() as session:
        session.mount("http://", requests_unixsocket.UnixAdapter())  # as firecracker-python does
        case.call_and_validate(
            base_url=base_url,
            session=session,
            timeout=10,
            # pyrovm refuses bodies the schema allows when the VM's state or the host says no (400s), and
            # accepts a few the schema would not (lower-case log levels); and it answers methods a path does
            # not have with a 400 "Invalid request method and/or path", as Firecracker does, not a 405
            excluded_checks=[positive_data_acceptance, negative_data_rejection, unsupported_method],
        )
