"""The OpenAPI document says what the API enforces.

The main test runs Schemathesis (a property-based API tester) over every route of a real
``kie-extend serve`` process, with a Celery worker, beat and the simulator behind it, all on our own
Valkey: requests generated from ``/openapi.json`` must be accepted when schema-valid, and every
answer must be documented (status, content type, body schema), never a server error. The other
tests pin the rules JSON Schema can only describe, and the links.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests

from kie_extend import api
from kie_extend.cli.devstack import DevStack
from kie_extend.errors import ValidationError
from kie_extend.http.app import openapi_text
from kie_extend.http.schemas import CURSOR_SCHEMA_PATTERN, extend_request_schema
from kie_extend.jobs.listing import decode_cursor, encode_cursor
from kie_extend.jobs.request import LENGTH_LIMITS, ExtendRequest

WRITE = "w-" + uuid.uuid4().hex
READ = "r-" + uuid.uuid4().hex
#: The tester's checks: no 5xx, documented status codes, content types and bodies, and schema-valid
#: requests accepted (the "schema-valid request rejected" failure).
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "positive_data_acceptance")
#: Cases per operation and phase; with the stateful phase this keeps the run near a minute.
MAX_EXAMPLES = 25
#: Fixed, so a failure reproduces (``st run ... --seed`` with the same number).
SEED = 20261203


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, str]]:
    """A whole system: Valkey, simulator, ``kie-extend serve`` (private upload URLs refused, as in
    production), a Celery worker and beat."""
    workdir = tmp_path_factory.mktemp("openapi")
    env = {"KIE_ALLOW_PRIVATE_URLS": "false", "KIE_QUEUE": "openapi", "KIE_TICK_INTERVAL": "0.5s",
           "KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s"}
    with DevStack(workdir, key_prefix=f"oa{uuid.uuid4().hex[:6]}", env=env) as stack:
        stack.start_simulator("--time-factor", "0.02", "--seed", "5", "--no-callbacks")
        url = stack.start_serve([WRITE, f"read:{READ}"])
        stack.start_worker(concurrency=1, pool="solo")
        stack.start_beat()
        yield stack, url


def test_schemathesis_finds_no_failure_on_any_route(served: tuple[DevStack, str], tmp_path: Path) -> None:
    """Every phase (examples, coverage, fuzzing, stateful via the links) over every operation."""
    stack, url = served
    assert len(requests.get(url + "/openapi.json", timeout=5).json()["paths"]) >= 10
    cmd = [str(Path(sys.executable).parent / "st"), "run", url + "/openapi.json",
           "--header", f"Authorization: Bearer {WRITE}", "--checks", ",".join(CHECKS),
           "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
           "--request-timeout", "10", "--generation-database", "none", "--no-color",
           "--report", "json", "--report-json-path", str(tmp_path / "report.json")]
    # tests/openapi_hooks.py moves a past not_after ahead: the one rule that depends on the clock.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "openapi_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    logs = "\n".join(f"--- {c.name}\n{Path(c.log_path).read_text()[-2000:]}" for c in stack.children)
    assert p.returncode == 0, f"{out[-12000:]}\n{logs}"
    tested = re.search(r"Tested:\s+(\d+)", out)
    assert tested and int(tested.group(1)) == len(_operations(requests.get(url + "/openapi.json", timeout=5).json()))
    assert "Stateful" in out and WRITE not in out


def _operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m.upper(), p) for p, item in doc["paths"].items() for m in item]


# ----- the rules the document states --------------------------------------------------------------

def _valid(schema: dict[str, Any], value: Any) -> bool:
    return bool(jsonschema_rs.validator_for(schema).is_valid(value))


def _accepted(request: dict[str, Any]) -> bool:
    from kie_extend.config import Settings

    try:
        api.check_extend(request, settings=Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0"))
        return True
    except ValidationError:
        return False


def _req(**fields: Any) -> dict[str, Any]:
    body = {"uploadUrl": "https://files.example.org/a.mp3", "defaultParamFlag": True, "instrumental": False,
            "continueAt": 10, "model": "V5", "prompt": "la", "style": "folk", "title": "Song"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


CASES = [
    ("valid custom", _req()),
    ("valid default mode", {"uploadUrl": "https://a.example.com/x", "defaultParamFlag": False, "model": "V4"}),
    ("unknown fields pass through", _req(customMode=True, anything={"x": 1})),
    ("custom mode without style", _req(style=...)),
    ("custom mode with a null title", _req(title=None)),
    ("custom mode without continueAt", _req(continueAt=...)),
    ("instrumental=false needs prompt", _req(prompt=...)),
    ("instrumental=true needs no prompt", _req(prompt=..., instrumental=True)),
    ("instrumental absent: prompt optional", _req(prompt=..., instrumental=...)),
    ("V4 title limit", _req(model="V4", title="t" * LENGTH_LIMITS["V4"][2])),
    ("V4 title too long", _req(model="V4", title="t" * (LENGTH_LIMITS["V4"][2] + 1))),
    ("V4_5ALL title too long", _req(model="V4_5ALL", title="t" * 81)),
    ("V5 title of 100", _req(model="V5", title="t" * 100)),
    ("V4 style too long", _req(model="V4", style="s" * 201)),
    ("V4 prompt too long", _req(model="V4", prompt="p" * 3001)),
    ("long prompt unused when instrumental", _req(model="V4", prompt="p" * 3001, instrumental=True)),
    ("long texts in default mode", {"uploadUrl": "https://a.example.com/x", "defaultParamFlag": False, "model": "V4",
                                    "title": "t" * 500}),
    ("personaId in default mode", {"uploadUrl": "https://a.example.com/x", "defaultParamFlag": False,
                                   "model": "V4", "personaId": "p1"}),
    ("blank personaId in default mode", {"uploadUrl": "https://a.example.com/x", "defaultParamFlag": False,
                                         "model": "V4", "personaId": "  "}),
    ("personaId in custom mode", _req(personaId="p1")),
    ("continueAt 0", _req(continueAt=0)),
    ("weight 0.5", _req(styleWeight=0.5)),
    ("weight 1.5", _req(styleWeight=1.5)),
    ("weight 0.123", _req(audioWeight=0.123)),
    ("model V9", _req(model="V9")),
    ("vocalGender x", _req(vocalGender="x")),
    ("ftp upload", _req(uploadUrl="ftp://files.example.org/a.mp3")),
    ("port out of range", _req(uploadUrl="https://files.example.org:70000/a.mp3")),
    ("string flag", _req(defaultParamFlag="true")),
]


@pytest.mark.parametrize("name,request_body", CASES, ids=[c[0] for c in CASES])
def test_schema_and_validation_agree(name: str, request_body: dict[str, Any]) -> None:
    """The cross-field rules (custom mode, per-model lengths, personaId) are in the schema as
    ``if``/``then``: the schema and the Python API's checks agree on each case."""
    assert _valid(extend_request_schema(), request_body) == _accepted(request_body), name


def test_private_upload_hosts_are_outside_the_pattern_and_refused() -> None:
    """The public-host rule cannot be a JSON Schema rule; the pattern keeps to DNS names, so every
    URL it admits is accepted, and the local ones the API refuses fall outside it."""
    schema = extend_request_schema()
    for host in ("localhost", "127.0.0.1", "10.1.2.3", "[::1]", "169.254.169.254", "0x7f.1"):
        body = _req(uploadUrl=f"http://{host}/a.mp3")
        assert not _valid(schema, body) and not _accepted(body), host
    for url in ("https://cdn.example.org:8443/a_b.mp3?x=1&y=2#t", "http://a-b.c.io/"):
        assert _valid(schema, _req(uploadUrl=url)) and _accepted(_req(uploadUrl=url)), url


def test_every_request_field_is_documented() -> None:
    documented = set(extend_request_schema()["properties"])
    assert documented == set(ExtendRequest.model_fields)
    enum = extend_request_schema()["properties"]["model"]["enum"]
    assert set(enum) == set(LENGTH_LIMITS)


def test_links_name_real_operations_and_parameters() -> None:
    doc = json.loads(openapi_text())
    ops = {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}
    assert len(ops) == len(_operations(doc))  # every operation has its own id
    found = 0
    for item in doc["paths"].values():
        for op in item.values():
            for answer in op["responses"].values():
                for link in answer.get("links", {}).values():
                    target = ops[link["operationId"]]
                    names = {p["name"] for p in target.get("parameters", [])}
                    assert set(link["parameters"]) <= names, link
                    found += 1
    submit = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    assert {link["operationId"] for link in submit.values()} >= {"getJob", "cancelJob", "retryJob", "getBatch"}
    assert submit["GetJob"]["parameters"] == {"job_id": "$response.body#/job_id"}
    assert found >= 15
    # No route documents FastAPI's own 422 shape: this app answers {"error": {...}} everywhere.
    assert "HTTPValidationError" not in json.dumps(doc)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert {"401", "503"} <= set(op["responses"]), (method, path)


def test_list_parameters_state_their_rules() -> None:
    doc = json.loads(openapi_text())
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert params["state"]["enum"] == ["queued", "submitting", "submitted", "succeeded", "failed", "cancelled"]
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 500)
    assert params["cursor"]["pattern"] == CURSOR_SCHEMA_PATTERN


def test_cursor_form() -> None:
    cursor = encode_cursor(1764765000.123456, "job-1")
    assert re.fullmatch(CURSOR_SCHEMA_PATTERN, cursor) and decode_cursor(cursor) == (1764765000.123456, "job-1")
    for bad in ("", "abc", "1~", "~x", "nan~x", "inf~x", "-1~x"):
        with pytest.raises(ValidationError):
            decode_cursor(bad)


def test_list_answers_any_well_formed_cursor_and_integral_priorities(served: tuple[DevStack, str]) -> None:
    """A cursor of the documented form is a position: it pages from there (here: nothing older);
    JSON's 7.0 is the integer 7 for priority."""
    stack, url = served
    auth = {"Authorization": f"Bearer {WRITE}"}
    r = requests.get(url + "/v1/jobs", params={"cursor": "1.5~zz"}, headers=auth, timeout=10)
    assert r.status_code == 200 and r.json() == {"jobs": [], "next_cursor": None}, r.text
    r = requests.get(url + "/v1/jobs", params={"cursor": "not-a-cursor"}, headers=auth, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "cursor"
    body = {"request": _req(uploadUrl=f"{stack.sim_url}/files/source/30s.mp3"), "priority": 7.0}
    r = requests.post(url + "/v1/jobs", json=body, headers=auth, timeout=10)
    assert r.status_code == 422 and [e["field"] for e in r.json()["error"]["errors"]] == ["uploadUrl"]
    body["request"] = _req()
    r = requests.post(url + "/v1/jobs", json=body, headers=auth, timeout=10)
    assert r.status_code == 202, r.text
