"""Authentication (issue #37): with DRAFTALIGN_API_KEY in the serving environment every route but /health needs
`Authorization: Bearer <key>`; real Ray Serve on 127.0.0.1, the real openai client. The key never reaches a log."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from cluster_helpers import free_port, serving

KEY = "draftalign-test-key-7f3a9c"


@pytest.fixture(scope="module")
def keyed_server(tiny_target_path, tiny_draft_path):
    import ray

    from draftalign.config import JobConfig

    mp = pytest.MonkeyPatch()
    mp.setenv("DRAFTALIGN_API_KEY", KEY)  # before Ray starts: its workers inherit this environment
    cfg = JobConfig.model_validate({
        "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 256},
        "serve": {"port": free_port(), "gamma": 2, "cpus_per_replica": 1, "model_name": "draftalign"}})
    try:
        with serving(cfg, tiny_draft_path) as url:
            yield url, Path(ray._private.worker.global_worker.node.get_session_dir_path())
    finally:
        mp.undo()


@pytest.mark.slow
def test_routes_need_the_key_except_health(keyed_server):
    url, _ = keyed_server
    root = url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=60) as http:
        assert http.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/debug/stats")]:
            r = http.request(method, path, json={"model": "draftalign", "prompt": "hi"})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    out = client.completions.create(model="draftalign", prompt="The capital of France is", max_tokens=4,
                                    temperature=0)
    assert out.usage.completion_tokens >= 1


@pytest.mark.slow
def test_the_key_is_never_logged(keyed_server):
    url, session = keyed_server
    openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120).models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs, f"no Ray logs under {session}"
    leaked = [str(p) for p in logs if KEY.encode() in p.read_bytes()]
    assert leaked == []
