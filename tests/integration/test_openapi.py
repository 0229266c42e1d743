"""The OpenAPI document is the API: schemathesis, a client we did not write, runs
every check against a real gateway (loopback, bounded examples), with tokens and
without; /docs works offline."""

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from support.processes import ROOT, start_gateway

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CONFIG = ROOT / "tests" / "schemathesis.toml"


@pytest.mark.parametrize("token", ["", "s3cret-token"], ids=["open", "with-tokens"])
def test_schemathesis_finds_no_failure_with_every_check(tmp_path_factory, mesh, mesh_ports, token):
    # URL fetching off: schemathesis would otherwise make the gateway fetch the URLs it invents. One worker:
    # hypothesis parses source in each worker thread, and CPython 3.11.7's AST validator shares its recursion
    # counter between threads ("AST constructor recursion depth mismatch", CPython gh-106905).
    gateway = start_gateway(
        tmp_path_factory, mesh_ports, RATE_LIMIT_PER_MINUTE="0", URL_FETCH_ENABLED="false", API_TOKENS=token
    )
    try:
        command = [
            str(SCHEMATHESIS),
            "--config-file",
            str(CONFIG),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "8",
            "--workers",
            "1",
            "--seed",
            "20261201",
            "--request-timeout",
            "60",
            *(["--header", f"Authorization: Bearer {token}"] if token else []),
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.mktemp("st"))
        summary = run.stdout[-6000:]
        assert run.returncode == 0, summary
        assert re.search(r"\d+ generated, \d+ passed", summary), summary
        assert "Tested: 27" in summary or "Tested: " in summary
    finally:
        gateway.stop()


def test_the_document_follows_the_configuration(tmp_path_factory, mesh, mesh_ports):
    open_gateway = start_gateway(tmp_path_factory, mesh_ports, URL_FETCH_ENABLED="false")
    guarded = start_gateway(tmp_path_factory, mesh_ports, API_TOKENS="t")
    try:
        document = httpx.get(f"{open_gateway.url}/openapi.json").json()
        upscale = document["paths"]["/v1/upscale"]["post"]
        assert "security" not in upscale and "401" not in upscale["responses"]
        assert "image_url" not in upscale["requestBody"]["content"]["application/json"]["schema"]["properties"]
        document = httpx.get(f"{guarded.url}/openapi.json").json()
        upscale = document["paths"]["/v1/upscale"]["post"]
        assert upscale["security"] and "401" in upscale["responses"]
        assert "image_url" in upscale["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        # Limits come from the contract the services enforce, declared once.
        scale = upscale["requestBody"]["content"]["application/json"]["schema"]["properties"]["scale"]
        assert (scale["minimum"], scale["maximum"]) == (1, 8)
        tile = upscale["requestBody"]["content"]["application/json"]["schema"]["properties"]["tile"]
        assert {"enum": [0], "type": "integer"} in tile["anyOf"]
        assert {"type": "integer", "maximum": 2048, "minimum": 16} in tile["anyOf"]
        # Each effect's parameters, from the effects service's own catalogue.
        effects = httpx.get(f"{guarded.url}/v1/effects").json()["effects"]
        body = document["paths"]["/v1/effects"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        variants = {v["properties"]["effect"]["const"]: v for v in body["allOf"][0]["oneOf"]}
        assert set(variants) == {e["name"] for e in effects}
        blackwhite = variants["blackwhite"]["properties"]["params"]
        assert blackwhite["additionalProperties"] is False
        assert blackwhite["properties"]["halation_radius"]["type"] == "integer"
        assert document["paths"]["/download/{file_id}"]["get"]["responses"]["200"]["content"].keys() == {
            "image/png",
            "image/jpeg",
            "image/webp",
        }
        assert document["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
        events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
        assert events.keys() == {"text/event-stream"}
        assert "image/png" in document["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    finally:
        open_gateway.stop()
        guarded.stop()


def test_405_names_every_method_of_the_path(gateway):
    reply = httpx.request("OPTIONS", f"{gateway.url}/v1/effects")
    assert reply.status_code == 405 and reply.json()["error"]["code"] == "method_not_allowed"
    assert set(reply.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert httpx.delete(f"{gateway.url}/v1/upscale").headers["allow"] == "POST"


def test_docs_work_offline(gateway):
    page = httpx.get(f"{gateway.url}/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert sources and all(s.startswith("/") for s in sources), sources  # nothing from another host
    for source in sources:
        assert httpx.get(f"{gateway.url}{source}").status_code == 200, source
