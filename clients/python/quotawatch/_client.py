"""The blocking and the asyncio clients of the quotawatch REST API."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, Iterator, Mapping, Optional

import httpx

from ._errors import APIConnectionError, error_from_answer
from ._models import Check, Notifications, Status
from ._reporting import ReservationState, usage_body

if TYPE_CHECKING:
    from ._watch import AsyncWatch, Watch

__version__ = "0.1.0"

#: Names the workspace a service key acts for.
WORKSPACE_HEADER = "X-Quotawatch-Workspace"

DEFAULT_TIMEOUT = 10.0

logger = logging.getLogger("quotawatch")


class _Request:
    """One API call, described once for both clients."""

    def __init__(self, method: str, path: str, *, json: Any = None, params: Optional[Dict[str, str]] = None) -> None:
        self.method = method
        self.path = path
        self.json = json
        self.params = params


def _status_request() -> _Request:
    return _Request("GET", "/api/quota/status")


def _notifications_request(history: bool) -> _Request:
    return _Request("GET", "/api/quota/notifications", params={"include": "history"} if history else None)


def _check_request(model: Optional[str], estimated_tokens: Optional[int]) -> _Request:
    body = {"model": model, "estimated_tokens": estimated_tokens}
    return _Request("POST", "/api/quota/check", json={k: v for k, v in body.items() if v is not None})


def _usage_request(body: Dict[str, Any]) -> _Request:
    return _Request("POST", "/api/quota/usage", json=body)


def _ticket_request() -> _Request:
    return _Request("POST", "/api/quota/ws-ticket")


def _answer(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    raise error_from_answer(response.status_code, response.headers, response.content)


class _Settings:
    """What both clients are made of: where quotawatch is, the headers
    that authenticate, and which workspace a service key acts for."""

    def __init__(self, base_url: str, api_key: str, workspace: Optional[str], timeout: float) -> None:
        if not api_key:
            raise ValueError("a quotawatch key is needed (a workspace key, a service key or a token)")
        self.base_url = base_url.rstrip("/")
        self.workspace = workspace
        self.timeout = timeout
        self.api_key = api_key

    def headers(self) -> Dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Accept": "application/json",
            "User-Agent": f"quotawatch-python/{__version__}",
        }
        if self.workspace is not None:
            headers[WORKSPACE_HEADER] = self.workspace
        return headers

    def websocket_url(self) -> str:
        if self.base_url.startswith("https://"):
            return "wss://" + self.base_url[len("https://") :] + "/api/quota/ws"
        if self.base_url.startswith("http://"):
            return "ws://" + self.base_url[len("http://") :] + "/api/quota/ws"
        raise ValueError(f"base_url must start with http:// or https://, not {self.base_url!r}")

    def __repr__(self) -> str:
        # The key stays out of reprs, and so out of logs and tracebacks.
        return f"{self.base_url!r}, workspace={self.workspace!r}"


class Reservation(ReservationState):
    """An admitted call of a blocking :class:`Client`; see
    :meth:`Client.reserve`."""

    def __init__(self, client: "Client", check: Check, model: Optional[str]) -> None:
        super().__init__(check, model)
        self._client = client

    def settle(self) -> Optional[Status]:
        """Sends the usage report now; later calls do nothing."""
        if self.settled:
            return None
        return self._client.usage(**self.settlement())


class AsyncReservation(ReservationState):
    """An admitted call of an :class:`AsyncClient`; see
    :meth:`AsyncClient.reserve`."""

    def __init__(self, client: "AsyncClient", check: Check, model: Optional[str]) -> None:
        super().__init__(check, model)
        self._client = client

    async def settle(self) -> Optional[Status]:
        """Sends the usage report now; later calls do nothing."""
        if self.settled:
            return None
        return await self._client.usage(**self.settlement())


def _settle_failed(error: Exception) -> None:
    # The call's own exception matters more than its report: the reservation
    # then keeps its estimate until it expires on the server.
    logger.warning("could not report a call that raised to quotawatch: %s", error)


class Client:
    """A blocking client of quotawatch for one workspace.

    ``api_key`` is a workspace key, a browser token, or a service key with
    ``workspace`` naming the workspace it acts for (sent as the
    ``X-Quotawatch-Workspace`` header).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        workspace: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        http_client: Optional[httpx.Client] = None,
    ) -> None:
        self._settings = _Settings(base_url, api_key, workspace, timeout)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=timeout)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    @property
    def workspace(self) -> Optional[str]:
        return self._settings.workspace

    def for_workspace(self, workspace: str) -> "Client":
        """The same key acting for ``workspace`` (a service key), sharing
        this client's connections."""
        settings = self._settings
        return Client(
            settings.base_url, settings.api_key, workspace=workspace, timeout=settings.timeout, http_client=self._http
        )

    def status(self) -> Status:
        """The workspace's status document."""
        return Status.from_json(self._send(_status_request()))

    def notifications(self, *, history: bool = False) -> Notifications:
        """The active notifications; ``history=True`` adds resolved ones."""
        return Notifications.from_json(self._send(_notifications_request(history)))

    def check(self, *, model: Optional[str] = None, estimated_tokens: Optional[int] = None) -> Check:
        """Reserves one request and ``estimated_tokens`` (prompt plus most
        completion tokens), or raises :class:`RefusedError`."""
        return Check.from_json(self._send(_check_request(model, estimated_tokens)))

    def usage(
        self,
        *,
        reservation_id: Optional[str] = None,
        model: Optional[str] = None,
        usage: Any = None,
        status_code: Optional[int] = None,
        error: Any = None,
        headers: Optional[Mapping[str, str]] = None,
        latency_ms: Optional[int] = None,
    ) -> Status:
        """Reports a finished call (settling its reservation, if it had
        one) and answers the new status. ``usage``, ``error`` and
        ``headers`` may be OpenAI's objects as they came."""
        body = usage_body(
            reservation_id=reservation_id,
            model=model,
            usage=usage,
            status_code=status_code,
            error=error,
            headers=headers,
            latency_ms=latency_ms,
        )
        return Status.from_json(self._send(_usage_request(body)))

    @contextlib.contextmanager
    def reserve(self, *, model: Optional[str] = None, estimated_tokens: Optional[int] = None) -> Iterator[Reservation]:
        """Checks before the block and settles after it, whatever happens.

        Raises :class:`RefusedError` when quotawatch refuses (the block does
        not run). Inside, call ``reservation.report(usage=...)`` with what
        OpenAI answered; without it the reservation keeps its estimate. An
        exception leaving the block is reported as OpenAI's error answer
        when it carries one, and otherwise as a call that got no answer.
        """
        reservation = Reservation(self, self.check(model=model, estimated_tokens=estimated_tokens), model)
        try:
            yield reservation
        except BaseException as error:
            reservation.fail(error)
            try:
                reservation.settle()
            except Exception as settle_error:  # noqa: BLE001 - see _settle_failed
                _settle_failed(settle_error)
            raise
        reservation.settle()

    def watch(self, **options: Any) -> "Watch":
        """Follows the workspace live over the WebSocket; see :class:`Watch`."""
        from ._watch import Watch

        return Watch(self, **options)

    def ticket(self) -> str:
        """A single-use WebSocket ticket, valid for 60 seconds."""
        return self._send(_ticket_request())["ticket"]

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self._settings!r})"

    def _send(self, request: _Request) -> Any:
        try:
            response = self._http.request(
                request.method,
                self._settings.base_url + request.path,
                json=request.json,
                params=request.params,
                headers=self._settings.headers(),
                timeout=self._settings.timeout,
            )
        except httpx.HTTPError as error:
            raise APIConnectionError(f"quotawatch at {self._settings.base_url} did not answer: {error}") from error
        return _answer(response)


class AsyncClient:
    """The asyncio twin of :class:`Client`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        workspace: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self._settings = _Settings(base_url, api_key, workspace, timeout)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=timeout)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    @property
    def workspace(self) -> Optional[str]:
        return self._settings.workspace

    def for_workspace(self, workspace: str) -> "AsyncClient":
        """The same key acting for ``workspace`` (a service key), sharing
        this client's connections."""
        settings = self._settings
        return AsyncClient(
            settings.base_url, settings.api_key, workspace=workspace, timeout=settings.timeout, http_client=self._http
        )

    async def status(self) -> Status:
        """The workspace's status document."""
        return Status.from_json(await self._send(_status_request()))

    async def notifications(self, *, history: bool = False) -> Notifications:
        """The active notifications; ``history=True`` adds resolved ones."""
        return Notifications.from_json(await self._send(_notifications_request(history)))

    async def check(self, *, model: Optional[str] = None, estimated_tokens: Optional[int] = None) -> Check:
        """See :meth:`Client.check`."""
        return Check.from_json(await self._send(_check_request(model, estimated_tokens)))

    async def usage(
        self,
        *,
        reservation_id: Optional[str] = None,
        model: Optional[str] = None,
        usage: Any = None,
        status_code: Optional[int] = None,
        error: Any = None,
        headers: Optional[Mapping[str, str]] = None,
        latency_ms: Optional[int] = None,
    ) -> Status:
        """See :meth:`Client.usage`."""
        body = usage_body(
            reservation_id=reservation_id,
            model=model,
            usage=usage,
            status_code=status_code,
            error=error,
            headers=headers,
            latency_ms=latency_ms,
        )
        return Status.from_json(await self._send(_usage_request(body)))

    @contextlib.asynccontextmanager
    async def reserve(
        self, *, model: Optional[str] = None, estimated_tokens: Optional[int] = None
    ) -> AsyncIterator[AsyncReservation]:
        """See :meth:`Client.reserve`; a cancelled task settles too."""
        check = await self.check(model=model, estimated_tokens=estimated_tokens)
        reservation = AsyncReservation(self, check, model)
        try:
            yield reservation
        except BaseException as error:
            reservation.fail(error)
            try:
                await reservation.settle()
            except Exception as settle_error:  # noqa: BLE001 - see _settle_failed
                _settle_failed(settle_error)
            raise
        await reservation.settle()

    def watch(self, **options: Any) -> "AsyncWatch":
        """Follows the workspace live over the WebSocket; see
        :class:`AsyncWatch`."""
        from ._watch import AsyncWatch

        return AsyncWatch(self, **options)

    async def ticket(self) -> str:
        """A single-use WebSocket ticket, valid for 60 seconds."""
        return (await self._send(_ticket_request()))["ticket"]

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self._settings!r})"

    async def _send(self, request: _Request) -> Any:
        try:
            response = await self._http.request(
                request.method,
                self._settings.base_url + request.path,
                json=request.json,
                params=request.params,
                headers=self._settings.headers(),
                timeout=self._settings.timeout,
            )
        except httpx.HTTPError as error:
            raise APIConnectionError(f"quotawatch at {self._settings.base_url} did not answer: {error}") from error
        return _answer(response)
