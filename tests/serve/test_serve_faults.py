"""A model file replaced under a running `edgemoe serve`: requests that would read it fail
with a server error naming the cause, the server stays up and answers /health, and SIGTERM
still ends it cleanly. Weights of another file are never served."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import needs_cache
from test_serve_live import MODEL, Server, httpx

pytestmark = needs_cache


def test_a_model_replaced_under_serve_fails_requests_not_the_server(edgemoe_env, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(MODEL, path)
    srv = Server(edgemoe_env, "--parallel", "2", "--expert-cache", "25%", model=path)
    try:
        body = dict(model=path.name, prompt="Once upon a time", max_tokens=8, temperature=0)
        ok = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert ok.status_code == 200, ok.text

        other = tmp_path / "other.gguf"
        shutil.copyfile(MODEL, other)
        os.replace(other, path)
        bad = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert bad.status_code == 500, bad.text
        assert "was replaced while in use" in bad.json()["error"]["message"]
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        err = srv.stop()
        assert "Traceback" not in err
    finally:
        srv.kill()
