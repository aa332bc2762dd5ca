"""Quotas around the official ``openai`` client, without depending on it.

``wrap_openai(openai_client, quota_client)`` answers an object that behaves
like the OpenAI client, except that ``chat.completions.create``,
``responses.create`` and ``embeddings.create`` ask quotawatch first (raising
:class:`~quotawatch.RefusedError` when it refuses, before OpenAI is called)
and report each call after, with OpenAI's usage and rate-limit headers. A
stream is reported when it ends, with the usage of its last chunk: a chat
stream is asked for it (``stream_options.include_usage``), and that extra
chunk is kept from a caller who did not ask for it, as the proxy does.

Use it when the OpenAI client talks to OpenAI itself ("beside it"); a client
pointed at quotawatch's ``/v1`` proxy is already counted there.
"""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ._client import AsyncClient, Client

__all__ = ["wrap_openai", "estimate_tokens"]

#: Completion tokens reserved for a call that sets no maximum, as the
#: server's QUOTAWATCH_DEFAULT_MAX_TOKENS does by default.
DEFAULT_MAX_TOKENS = 1024

_CHAT, _RESPONSES, _EMBEDDINGS = "chat.completions", "responses", "embeddings"


class StreamClosedEarly(Exception):
    """Reported for a stream closed before its end: the call was abandoned."""


def estimate_tokens(endpoint: str, request: Mapping[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """The tokens a call may use at most: its prompt at four bytes per token
    (as OpenAI's own rate limiter approximates) plus ``n`` times its most
    output tokens. quotawatch settles the charge with the actual usage."""
    prompt = [request.get(name) for name in ("messages", "input", "instructions") if request.get(name) is not None]
    prompt_bytes = len(json.dumps(prompt, default=str, ensure_ascii=False).encode("utf-8"))
    prompt_tokens = math.ceil(prompt_bytes / 4)
    if endpoint == _EMBEDDINGS:
        return prompt_tokens
    most = next(
        (request[name] for name in ("max_completion_tokens", "max_tokens", "max_output_tokens") if request.get(name)),
        default_max_tokens,
    )
    return prompt_tokens + (request.get("n") or 1) * most


def _usage_of(item: Any) -> Any:
    """The usage an answer, a chat chunk or a Responses stream event
    (``response.completed``) carries, if any."""
    usage = getattr(item, "usage", None)
    if usage is None:
        usage = getattr(getattr(item, "response", None), "usage", None)
    return usage


def _is_usage_chunk(chunk: Any) -> bool:
    """The chat stream's extra last chunk: usage, and no choices."""
    return getattr(chunk, "usage", None) is not None and not getattr(chunk, "choices", None)


def _prepare(endpoint: str, request: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """The request to send, and whether a usage chunk the caller did not
    ask for must be kept from it."""
    if endpoint != _CHAT or not request.get("stream"):
        return request, False
    options = request.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage"):
        return request, False
    options = dict(options) if isinstance(options, Mapping) else {}
    options["include_usage"] = True
    return {**request, "stream_options": options}, True


class _Passthrough:
    """Everything of ``target``, except the ``members`` given."""

    def __init__(self, target: Any, members: Dict[str, Any]) -> None:
        self._target = target
        self._members = members

    def __getattr__(self, name: str) -> Any:
        if name in self._members:
            return self._members[name]
        return getattr(self._target, name)

    def __repr__(self) -> str:
        return f"<quotawatch metered {self._target!r}>"


def _wrapped(openai_client: Any, create: Callable[[str, Any], Callable[..., Any]]) -> _Passthrough:
    """The client with ``create`` of each metered resource replaced."""

    def metered(resource: Any, endpoint: str) -> _Passthrough:
        return _Passthrough(resource, {"create": create(endpoint, resource)})

    members: Dict[str, Any] = {}
    chat = getattr(openai_client, "chat", None)
    if chat is not None:
        members["chat"] = _Passthrough(chat, {"completions": metered(chat.completions, _CHAT)})
    for name in (_RESPONSES, _EMBEDDINGS):
        resource = getattr(openai_client, name, None)
        if resource is not None:
            members[name] = metered(resource, name)
    return _Passthrough(openai_client, members)


def _headers_of(raw: Any) -> Optional[Dict[str, str]]:
    headers = getattr(raw, "headers", None)
    return dict(headers.items()) if headers is not None else None


class _MeteredStream:
    """A stream that reports its call when it ends, is closed, or fails."""

    def __init__(self, stream: Any, reservation: Any, reserving: Any, headers: Any, hide_usage: bool) -> None:
        self._stream = stream
        self._iterator = iter(stream)
        self._reservation = reservation
        self._reserving = reserving
        self._headers = headers
        self._hide_usage = hide_usage

    def __iter__(self) -> "_MeteredStream":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._iterator)
            except StopIteration:
                self._finish(None)
                raise
            except BaseException as error:
                self._finish(error)
                raise
            usage = _usage_of(chunk)
            if usage is not None:
                self._reservation.report(usage=usage, headers=self._headers)
            if not (self._hide_usage and _is_usage_chunk(chunk)):
                return chunk

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._finish(StreamClosedEarly("the stream was closed before its end"))

    def __enter__(self) -> "_MeteredStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _finish(self, error: Optional[BaseException]) -> None:
        # An error after the usage arrived keeps the usage: a reservation
        # records an exception only when nothing was reported yet.
        if self._reservation.settled:
            return
        if error is None:
            self._reserving.__exit__(None, None, None)
        else:
            self._reserving.__exit__(type(error), error, error.__traceback__)


class _MeteredAsyncStream:
    """The asyncio twin of :class:`_MeteredStream`."""

    def __init__(self, stream: Any, reservation: Any, reserving: Any, headers: Any, hide_usage: bool) -> None:
        self._stream = stream
        self._iterator = stream.__aiter__()
        self._reservation = reservation
        self._reserving = reserving
        self._headers = headers
        self._hide_usage = hide_usage

    def __aiter__(self) -> "_MeteredAsyncStream":
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._iterator.__anext__()
            except StopAsyncIteration:
                await self._finish(None)
                raise
            except BaseException as error:
                await self._finish(error)
                raise
            usage = _usage_of(chunk)
            if usage is not None:
                self._reservation.report(usage=usage, headers=self._headers)
            if not (self._hide_usage and _is_usage_chunk(chunk)):
                return chunk

    async def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            closing = close()
            if inspect.isawaitable(closing):
                await closing
        await self._finish(StreamClosedEarly("the stream was closed before its end"))

    async def __aenter__(self) -> "_MeteredAsyncStream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def _finish(self, error: Optional[BaseException]) -> None:
        if self._reservation.settled:
            return
        if error is None:
            await self._reserving.__aexit__(None, None, None)
        else:
            await self._reserving.__aexit__(type(error), error, error.__traceback__)


def _sync_create(quota: Client, default_max_tokens: int) -> Callable[[str, Any], Callable[..., Any]]:
    def create(endpoint: str, resource: Any) -> Callable[..., Any]:
        def metered_create(**request: Any) -> Any:
            request, hide_usage = _prepare(endpoint, request)
            reserving = quota.reserve(
                model=request.get("model"), estimated_tokens=estimate_tokens(endpoint, request, default_max_tokens)
            )
            reservation = reserving.__enter__()
            try:
                raw_api = getattr(resource, "with_raw_response", None)
                if raw_api is not None:
                    raw = raw_api.create(**request)
                    answer, headers = raw.parse(), _headers_of(raw)
                else:
                    answer, headers = resource.create(**request), None
            except BaseException as error:
                reserving.__exit__(type(error), error, error.__traceback__)
                raise
            if request.get("stream"):
                return _MeteredStream(answer, reservation, reserving, headers, hide_usage)
            reservation.report(usage=_usage_of(answer), headers=headers)
            reserving.__exit__(None, None, None)
            return answer

        return metered_create

    return create


def _async_create(quota: AsyncClient, default_max_tokens: int) -> Callable[[str, Any], Callable[..., Any]]:
    def create(endpoint: str, resource: Any) -> Callable[..., Any]:
        async def metered_create(**request: Any) -> Any:
            request, hide_usage = _prepare(endpoint, request)
            reserving = quota.reserve(
                model=request.get("model"), estimated_tokens=estimate_tokens(endpoint, request, default_max_tokens)
            )
            reservation = await reserving.__aenter__()
            try:
                raw_api = getattr(resource, "with_raw_response", None)
                if raw_api is not None:
                    raw = await raw_api.create(**request)
                    answer, headers = raw.parse(), _headers_of(raw)
                    if inspect.isawaitable(answer):
                        answer = await answer
                else:
                    answer, headers = await resource.create(**request), None
            except BaseException as error:
                await reserving.__aexit__(type(error), error, error.__traceback__)
                raise
            if request.get("stream"):
                return _MeteredAsyncStream(answer, reservation, reserving, headers, hide_usage)
            reservation.report(usage=_usage_of(answer), headers=headers)
            await reserving.__aexit__(None, None, None)
            return answer

        return metered_create

    return create


def wrap_openai(openai_client: Any, quota_client: Any, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Any:
    """``openai_client`` (``openai.OpenAI`` with a :class:`Client`, or
    ``openai.AsyncOpenAI`` with an :class:`AsyncClient`) with each call of
    ``chat.completions.create``, ``responses.create`` and
    ``embeddings.create`` checked before and reported after."""
    if isinstance(quota_client, AsyncClient):
        return _wrapped(openai_client, _async_create(quota_client, default_max_tokens))
    if isinstance(quota_client, Client):
        return _wrapped(openai_client, _sync_create(quota_client, default_max_tokens))
    raise TypeError(f"quota_client must be a quotawatch Client or AsyncClient, not {type(quota_client).__name__}")
