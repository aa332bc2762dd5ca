"""Service keys (acting for the workspace a request names) and browser
tokens (reading one workspace), with the clients against a real
quotawatch."""

from __future__ import annotations

import httpx
import pytest

from quotawatch import BadRequestError, Client, NotFoundError, PermissionDeniedError

from test_fastapi import ask, make_app
from test_watch import DEADLINE


def service_key(server, workspaces):
    created = server.admin("POST", "/api/service-keys", {"name": "backend", "workspaces": workspaces})
    assert created["scopes"] == ["service"]
    return created["key"]


def browser_token(server, key, workspace):
    answer = httpx.post(
        server.url + "/api/tokens",
        json={"workspace": workspace, "expires_in": 900},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10.0,
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["token"]


def test_a_service_key_acts_for_the_workspace_it_names(server):
    acme, beta = server.workspace(), server.workspace()
    key = service_key(server, [acme.id, beta.id])
    with Client(server.url, key, workspace=acme.id) as quota:
        with quota.reserve(estimated_tokens=10) as reservation:
            reservation.report(usage={"prompt_tokens": 4})
        status = quota.status()
        assert status.workspace == acme.id
        assert status.usage.today.tokens == 4
        other = quota.for_workspace(beta.id).status()
        assert other.workspace == beta.id
        assert other.usage.today.requests == 0


def test_a_service_key_must_name_an_allowed_workspace(server):
    acme, stranger = server.workspace(), server.workspace()
    key = service_key(server, [acme.id])
    with Client(server.url, key) as nameless:
        with pytest.raises(BadRequestError) as unnamed:
            nameless.status()
    assert unnamed.value.code == "workspace_required"
    assert unnamed.value.param == "X-Quotawatch-Workspace"
    with Client(server.url, key, workspace=stranger.id) as elsewhere:
        with pytest.raises(NotFoundError) as refused:
            elsewhere.check()
    assert refused.value.code == "workspace_not_found"


def test_a_service_key_watches_the_workspace_it_names(server):
    acme = server.workspace()
    key = service_key(server, [acme.id])
    with Client(server.url, key, workspace=acme.id) as quota, quota.watch() as events:
        first = [events.next(timeout=DEADLINE), events.next(timeout=DEADLINE)]
    assert {event.workspace for event in first} == {acme.id}


def test_a_browser_token_reads_and_follows_but_cannot_report(server):
    acme = server.workspace()
    token = browser_token(server, service_key(server, [acme.id]), acme.id)
    with Client(server.url, token) as reader:
        assert reader.status().workspace == acme.id
        assert reader.notifications().workspace == acme.id
        with pytest.raises(PermissionDeniedError) as denied:
            reader.check()
        assert denied.value.code == "missing_scope"
        assert "report" in denied.value.message
        with reader.watch() as events:
            status = next(event for event in (events.next(timeout=DEADLINE), events.next(timeout=DEADLINE)) if event.type == "status")
    assert status.workspace == acme.id


def test_one_service_key_serves_each_tenant_its_workspace(server):
    acme, beta = server.workspace(), server.workspace()
    app, quota = make_app(server, service_key(server, [acme.id, beta.id]), {"acme": acme.id, "beta": beta.id})
    first, second, third = ask(app, quota, ["acme", "beta", "acme"])
    assert [answer.json() for answer in (first, second, third)] == [
        {"workspace": acme.id, "tokens_today": 10},
        {"workspace": beta.id, "tokens_today": 10},
        {"workspace": acme.id, "tokens_today": 20},
    ]
