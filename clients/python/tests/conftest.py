"""Fixtures for tests against a real quotawatch.

The server is started by the Rust integration test
``tests/it/python_client.rs``, which passes its address, the admin key and
the mock OpenAI upstream's address in the environment. Without them the
tests that need a server fail (rather than skip), saying what is missing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

import httpx
import pytest

_SETTINGS = {
    "url": "QUOTAWATCH_TEST_URL",
    "admin_key": "QUOTAWATCH_TEST_ADMIN_KEY",
    "openai_url": "QUOTAWATCH_TEST_OPENAI_URL",
}


@dataclass(frozen=True)
class Workspace:
    id: str
    key: str
    key_id: str


@dataclass(frozen=True)
class Server:
    """A running quotawatch and the mock OpenAI upstream beside it."""

    url: str
    admin_key: str
    #: The mock upstream's base URL, ending in /v1, as the OpenAI SDK takes it.
    openai_url: str

    def admin(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        response = httpx.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10.0,
        )
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def workspace(self, **settings: Any) -> Workspace:
        """A fresh workspace with ``settings`` (``limits``, ``warn_at``, ...)
        and a key for it."""
        workspace_id = f"py-{uuid.uuid4().hex[:12]}"
        self.admin("POST", "/api/workspaces", {"id": workspace_id, **settings})
        key = self.admin("POST", f"/api/workspaces/{workspace_id}/keys", {})
        return Workspace(id=workspace_id, key=key["key"], key_id=key["id"])

    def mock_hits(self, path: str) -> int:
        """Requests the mock upstream received on ``path`` (under /v1)."""
        stats = httpx.get(self.openai_url[: -len("/v1")] + "/mock/stats", timeout=10.0).json()
        return stats["requests"].get(path, 0)


@pytest.fixture(scope="session")
def server() -> Server:
    missing = [name for name in _SETTINGS.values() if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: these tests need a running quotawatch and are run by "
            "`cargo test --test it python_client` (with QUOTAWATCH_TEST_PYTHON set), which starts one",
            pytrace=False,
        )
    return Server(**{field: os.environ[name] for field, name in _SETTINGS.items()})


@pytest.fixture
def workspace(server: Server) -> Workspace:
    """A workspace with room for 100 requests and 100,000 tokens a day, and
    no minute limits."""
    return server.workspace(limits={"requests_per_day": 100, "tokens_per_day": 100_000, "requests_per_minute": None})
