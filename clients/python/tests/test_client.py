"""Status, checks, usage reports, refusals and reservations against a real
quotawatch, with the blocking and the asyncio client."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import httpx
import pytest

from quotawatch import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    LimitForecast,
    NotFoundError,
    RefusedError,
    ThresholdCrossing,
)


class OpenAIStyleError(Exception):
    """An exception shaped like the ``openai`` package's error answers:
    ``status_code``, ``body`` with OpenAI's error object, ``response`` with
    the headers."""

    def __init__(self, status_code, body, headers):
        super().__init__(body["message"])
        self.status_code = status_code
        self.body = body
        self.response = type("Response", (), {"status_code": status_code, "headers": headers})()


def test_status_check_and_usage_round_trip(server, workspace):
    with Client(server.url, workspace.key) as quota:
        status = quota.status()
        assert status.workspace == workspace.id
        assert status.status == "normal"
        assert status.limits["requests_per_day"].used == 0
        assert status.usage.today.requests == 0

        check = quota.check(model="gpt-4o-mini", estimated_tokens=100)
        assert check.reservation_id.startswith("rsv_")
        assert check.probe is False
        assert check.remaining == {"requests_per_day": 99, "tokens_per_day": 99_900}
        assert quota.status().limits["tokens_per_day"].used == 100, "the estimate is held"

        after = quota.usage(
            reservation_id=check.reservation_id,
            model="gpt-4o-mini",
            usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
            headers={"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499"},
            latency_ms=120,
        )
        assert after.limits["requests_per_day"].used == 1
        assert after.limits["tokens_per_day"].used == 42, "settled with the actual usage"
        assert after.upstream_requests is not None and after.upstream_requests.remaining == 499

        notifications = quota.notifications(history=True)
        assert notifications.workspace == workspace.id
        assert notifications.status == "normal"
        assert notifications.notifications == []


def test_a_refusal_raises_with_when_to_retry(server):
    tight = server.workspace(limits={"requests_per_minute": 1, "requests_per_day": 100})
    with Client(server.url, tight.key) as quota:
        quota.check(estimated_tokens=1)
        with pytest.raises(RefusedError) as refused:
            quota.check(estimated_tokens=1)
    error = refused.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert tight.id in error.message
    assert error.retry_after is not None and 0 < error.retry_after <= 60
    assert error.should_retry is True
    assert error.billing_block is False


def test_a_used_up_day_is_refused_without_retrying(server):
    day = server.workspace(limits={"requests_per_day": 1})
    with Client(server.url, day.key) as quota:
        quota.check()
        with pytest.raises(RefusedError) as refused:
            quota.check()
    assert refused.value.code == "daily_limit_exceeded"
    assert refused.value.should_retry is False
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


def test_a_used_up_month_is_refused_without_retrying(server):
    month = server.workspace(
        limits={"requests_per_minute": None, "requests_per_day": None, "tokens_per_month": 1_000}
    )
    with Client(server.url, month.key) as quota:
        check = quota.check(estimated_tokens=600)
        assert check.remaining == {"tokens_per_month": 400}
        status = quota.status()
        assert status.limits["tokens_per_month"].used == 600
        assert status.limits["tokens_per_month"].resets_at is not None
        assert status.usage.this_month is not None and status.usage.this_month.tokens == 600
        with pytest.raises(RefusedError) as refused:
            quota.check(estimated_tokens=500)
    assert refused.value.code == "monthly_limit_exceeded"
    assert refused.value.should_retry is False
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


def test_a_forecast_and_a_threshold_crossing_are_typed(server):
    day = server.workspace(limits={"requests_per_minute": 100, "requests_per_day": 1})
    with Client(server.url, day.key) as quota:
        quota.check()
        # Forecasts and thresholds are evaluated at the server's next tick.
        deadline = time.monotonic() + 10
        while True:
            status = quota.status()
            forecast = status.limits["requests_per_day"].forecast
            crossed = {
                n.threshold.percent: n
                for n in quota.notifications().notifications
                if n.kind == "threshold_crossed"
            }
            if forecast is not None and forecast.basis == "used_up" and 100 in crossed:
                break
            assert time.monotonic() < deadline, f"no used-up forecast or crossing: {status.raw}"
            time.sleep(0.05)
    assert isinstance(forecast, LimitForecast)
    assert isinstance(forecast.exhausts_at, datetime), "a used-up limit runs out now"
    assert forecast.rate_per_hour >= 0
    # One request in the last 10 seconds does not run out a minute's 100.
    minute = status.limits["requests_per_minute"].forecast
    assert minute is not None and minute.basis == "recent_seconds"
    assert minute.exhausts_at is None
    crossing = crossed[100].threshold
    assert isinstance(crossing, ThresholdCrossing)
    assert (crossing.percent, crossing.used, crossing.limit, crossing.window) == (100, 1, 1, "day")
    assert crossing.period_end == status.limits["requests_per_day"].resets_at
    assert crossing.period_start is not None and crossing.period_start < crossing.period_end


def test_a_billing_block_is_told_apart(server, workspace):
    with Client(server.url, workspace.key) as quota:
        quota.usage(
            status_code=429,
            error={"type": "insufficient_quota", "code": "insufficient_quota", "message": "You exceeded your quota."},
        )
        assert quota.status().billing_block is not None
        with pytest.raises(RefusedError) as refused:
            quota.check()
    assert refused.value.billing_block is True
    assert refused.value.code == "insufficient_quota"
    assert refused.value.should_retry is False


def test_errors_are_typed_with_the_servers_code_and_param(server, workspace):
    with Client(server.url, "qw_not_a_real_key") as stranger:
        with pytest.raises(AuthenticationError) as unauthenticated:
            stranger.status()
    assert unauthenticated.value.status_code == 401
    assert unauthenticated.value.code == "invalid_api_key"

    with Client(server.url, workspace.key) as quota:
        with pytest.raises(BadRequestError) as too_many:
            quota.check(estimated_tokens=2_000_000_000)
        assert too_many.value.param == "estimated_tokens"
        assert too_many.value.code == "invalid_value"
        with pytest.raises(NotFoundError) as unknown:
            quota.usage(reservation_id="rsv_00000000000000ff")
        assert unknown.value.code == "reservation_not_found"

    # Nothing listens on port 9 of the loopback (discard): a refused connection.
    with Client("http://127.0.0.1:9", workspace.key, timeout=2.0) as nowhere:
        with pytest.raises(APIConnectionError):
            nowhere.status()


def test_reserve_settles_with_the_reported_usage(server, workspace):
    with Client(server.url, workspace.key) as quota:
        with quota.reserve(model="gpt-4o-mini", estimated_tokens=500) as reservation:
            assert quota.status().limits["tokens_per_day"].used == 500, "held while the call runs"
            reservation.report(usage={"prompt_tokens": 20, "completion_tokens": 5})
        assert reservation.settled
        status = quota.status()
        assert status.limits["requests_per_day"].used == 1
        assert status.limits["tokens_per_day"].used == 25
        # Settled once: the reservation is gone.
        with pytest.raises(NotFoundError):
            quota.usage(reservation_id=reservation.reservation_id)


def test_reserve_without_a_report_keeps_the_estimate(server, workspace):
    with Client(server.url, workspace.key) as quota:
        with quota.reserve(estimated_tokens=70) as reservation:
            pass
        assert reservation.settled
        status = quota.status()
        assert status.limits["tokens_per_day"].used == 70
        assert status.errors.other == 0 and status.errors.server_error == 0, "a success"


def test_reserve_settles_when_the_block_raises(server, workspace):
    with Client(server.url, workspace.key) as quota:
        with pytest.raises(ValueError, match="the app failed"):
            with quota.reserve(estimated_tokens=300) as reservation:
                raise ValueError("the app failed")
        assert reservation.settled
        with pytest.raises(NotFoundError):
            quota.usage(reservation_id=reservation.reservation_id)
        status = quota.status()
        # Nothing is known of the call's usage: its estimate stays, and it
        # counts as a failed call.
        assert status.limits["tokens_per_day"].used == 300
        assert status.limits["requests_per_day"].used == 1
        assert status.errors.other == 1


def test_reserve_reports_openais_error_answer_from_the_exception(server, workspace):
    with Client(server.url, workspace.key) as quota:
        error = OpenAIStyleError(
            429,
            {"message": "You exceeded your current quota.", "type": "insufficient_quota", "code": "insufficient_quota"},
            {"x-ratelimit-remaining-requests": "0"},
        )
        with pytest.raises(OpenAIStyleError):
            with quota.reserve(estimated_tokens=400):
                raise error
        status = quota.status()
        assert status.limits["tokens_per_day"].used == 0, "OpenAI bills no tokens for an error answer"
        assert status.billing_block is not None and status.billing_block.code == "insufficient_quota"
        assert status.status == "quota_exceeded"
        assert status.upstream_requests is not None and status.upstream_requests.remaining == 0


def test_reserve_reports_a_timeout_as_a_call_without_answer(server, workspace):
    with Client(server.url, workspace.key) as quota:
        with pytest.raises(TimeoutError):
            with quota.reserve(estimated_tokens=10):
                raise TimeoutError("OpenAI did not answer")
        status = quota.status()
    assert status.errors.server_error == 1
    assert status.limits["tokens_per_day"].used == 10


def test_a_refused_reserve_does_not_run_its_block(server):
    day = server.workspace(limits={"requests_per_day": 1})
    ran = []
    with Client(server.url, day.key) as quota:
        quota.check()
        with pytest.raises(RefusedError):
            with quota.reserve(estimated_tokens=1):
                ran.append(True)
    assert ran == []


def test_the_async_client_round_trip_and_reserve(server, workspace):
    async def scenario():
        async with AsyncClient(server.url, workspace.key) as quota:
            assert (await quota.status()).workspace == workspace.id
            async with quota.reserve(model="gpt-4o-mini", estimated_tokens=200) as reservation:
                assert (await quota.status()).limits["tokens_per_day"].used == 200
                reservation.report(usage={"input_tokens": 11, "output_tokens": 4})
            status = await quota.status()
            assert status.limits["tokens_per_day"].used == 15, "Responses-shaped usage"

            with pytest.raises(KeyError):
                async with quota.reserve(estimated_tokens=50) as failing:
                    raise KeyError("missing")
            assert failing.settled
            status = await quota.status()
            assert status.limits["tokens_per_day"].used == 65
            assert status.errors.other == 1

            notifications = await quota.notifications()
            assert notifications.workspace == workspace.id

    asyncio.run(scenario())


def test_a_cancelled_task_settles_its_reservation(server, workspace):
    async def scenario():
        async with AsyncClient(server.url, workspace.key) as quota:
            entered = asyncio.Event()
            reservations = []

            async def call():
                async with quota.reserve(estimated_tokens=40) as reservation:
                    reservations.append(reservation)
                    entered.set()
                    await asyncio.Event().wait()

            task = asyncio.ensure_future(call())
            await asyncio.wait_for(entered.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert reservations[0].settled
            with pytest.raises(NotFoundError):
                await quota.usage(reservation_id=reservations[0].reservation_id)

    asyncio.run(scenario())


def test_an_async_refusal_carries_retry_after(server):
    tight = server.workspace(limits={"requests_per_minute": 1})

    async def scenario():
        async with AsyncClient(server.url, tight.key) as quota:
            await quota.check()
            with pytest.raises(RefusedError) as refused:
                async with quota.reserve():
                    raise AssertionError("a refused call does not run")
            return refused.value

    refusal = asyncio.run(scenario())
    assert refusal.code == "rate_limit_exceeded"
    assert refusal.retry_after is not None and 0 < refusal.retry_after <= 60


def test_a_service_key_names_its_workspace_in_a_header():
    # What the client sends, recorded by httpx's mock transport: the server
    # side of service keys is tested where the server is.
    seen = []

    def answer(request):
        seen.append((request.url.path, request.headers.get("x-quotawatch-workspace")))
        return httpx.Response(200, json={"ticket": "wst_x", "expires_at": "2026-12-02T09:30:00.000Z"})

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        service = Client("http://quotawatch.test", "qws_service", workspace="acme", http_client=http)
        service.ticket()
        service.for_workspace("beta").ticket()
        Client("http://quotawatch.test", "qw_workspace_key", http_client=http).ticket()
    assert seen == [
        ("/api/quota/ws-ticket", "acme"),
        ("/api/quota/ws-ticket", "beta"),
        ("/api/quota/ws-ticket", None),
    ]
