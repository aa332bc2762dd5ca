"""The FastAPI dependency, with the app served in-process over httpx's ASGI
transport and quotawatch for real."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import Depends, FastAPI, Header

from quotawatch import AsyncClient
from quotawatch.fastapi import quota_client_dependency


def make_app(server, key, workspaces):
    """An app whose tenants name themselves in ``X-Tenant``; ``workspaces``
    maps a tenant to its workspace."""

    def tenant_workspace(x_tenant: str = Header()) -> str:
        return workspaces[x_tenant]

    quota = quota_client_dependency(server.url, key, workspace=tenant_workspace)
    app = FastAPI()

    @app.post("/ask")
    async def answer(client: AsyncClient = Depends(quota)):
        async with client.reserve(model="gpt-4o-mini", estimated_tokens=50) as reservation:
            # The OpenAI call would be here.
            reservation.report(usage={"prompt_tokens": 7, "completion_tokens": 3})
        status = await client.status()
        return {"workspace": client.workspace, "tokens_today": status.usage.today.tokens}

    return app, quota


def ask(app, quota, tenants):
    """The app's answers to ``POST /ask`` for each tenant in turn."""

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as browser:
            try:
                return [await browser.post("/ask", headers={"X-Tenant": tenant}) for tenant in tenants]
            finally:
                await quota.client.aclose()

    return asyncio.run(scenario())


def test_a_route_gets_a_client_for_the_requests_workspace(server):
    workspace = server.workspace(limits={"requests_per_day": 10})
    app, quota = make_app(server, workspace.key, {"acme": workspace.id})
    (answer,) = ask(app, quota, ["acme"])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"workspace": workspace.id, "tokens_today": 10}


def test_a_refusal_becomes_429_with_retry_after(server):
    workspace = server.workspace(limits={"requests_per_minute": 1})
    app, quota = make_app(server, workspace.key, {"acme": workspace.id})
    admitted, refused = ask(app, quota, ["acme", "acme"])
    assert admitted.status_code == 200, admitted.text
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    detail = refused.json()["detail"]
    assert detail["code"] == "rate_limit_exceeded"
    assert detail["billing_block"] is False
