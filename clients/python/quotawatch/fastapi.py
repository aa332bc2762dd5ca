"""A FastAPI dependency that gives a route a quotawatch client for the
workspace of the current request.

FastAPI is imported only when the dependency is made, so that it is not a
dependency of this package. This module leaves out
``from __future__ import annotations``: FastAPI reads the dependency's
annotations as objects.
"""

import math
from typing import Any, AsyncIterator, Callable, Optional

import httpx

from ._client import DEFAULT_TIMEOUT, AsyncClient
from ._errors import RefusedError

__all__ = ["quota_client_dependency", "refusal_as_http_exception"]


def refusal_as_http_exception(refusal: RefusedError) -> Any:
    """The HTTP 429 a route answers for a refusal, with ``Retry-After``
    (whole seconds, rounded up) when quotawatch said when to come back."""
    from fastapi import HTTPException

    headers = {}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(refusal.retry_after)))
    detail = {
        "message": refusal.message,
        "code": refusal.code,
        "type": refusal.type,
        "retry_after": refusal.retry_after,
        "billing_block": refusal.billing_block,
    }
    return HTTPException(status_code=429, detail=detail, headers=headers or None)


def quota_client_dependency(
    base_url: str,
    api_key: str,
    *,
    workspace: Callable[..., Any],
    timeout: float = DEFAULT_TIMEOUT,
    http_client: Optional[httpx.AsyncClient] = None,
) -> Callable[..., AsyncIterator[AsyncClient]]:
    """A dependency answering an :class:`AsyncClient` that acts for the
    workspace ``workspace`` names for the request.

    ``workspace`` is itself a FastAPI dependency (a function of a header,
    of the signed-in user, ...) answering a workspace id; ``api_key`` is a
    service key allowed to act for those workspaces. A
    :class:`RefusedError` leaving the route becomes an HTTP 429 with
    ``Retry-After``. Every request shares one pool of connections, the
    dependency's ``client``; close it when the app stops
    (``await dependency.client.aclose()``).
    """
    from fastapi import Depends

    shared = AsyncClient(base_url, api_key, timeout=timeout, http_client=http_client)

    async def quota_client(name: str = Depends(workspace)) -> AsyncIterator[AsyncClient]:
        try:
            yield shared.for_workspace(name)
        except RefusedError as refusal:
            raise refusal_as_http_exception(refusal) from refusal

    quota_client.client = shared  # type: ignore[attr-defined]
    return quota_client
