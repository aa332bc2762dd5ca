"""The OpenAI wrapper with the official ``openai`` package, talking to the
mock OpenAI upstream directly while quotawatch counts beside it (REST
mode)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from quotawatch import AsyncClient, Client, RefusedError, wrap_openai
from quotawatch.openai import estimate_tokens

HELLO = [{"role": "user", "content": "Say hello"}]


def sync_openai(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="sk-test", max_retries=0)


def test_each_call_is_checked_and_reported_with_its_usage(server, workspace):
    with Client(server.url, workspace.key) as quota:
        client = wrap_openai(sync_openai(server), quota)

        chat = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=20)
        assert chat.choices[0].message.content == "Hello! How can I help you today?"
        status = quota.status()
        assert status.limits["requests_per_day"].used == 1
        assert status.limits["tokens_per_day"].used == 29
        # OpenAI's rate-limit headers reached quotawatch with the report.
        assert status.upstream_requests is not None and status.upstream_requests.remaining == 499

        embeddings = client.embeddings.create(model="text-embedding-3-small", input="Hello")
        assert embeddings.usage.total_tokens == 8
        response = client.responses.create(model="gpt-4.1", input="Hi")
        assert response.output_text == "Hi!"

        status = quota.status()
        assert status.limits["requests_per_day"].used == 3
        assert status.limits["tokens_per_day"].used == 29 + 8 + 11
        # Everything else of the client is the client's own.
        assert client.models is not None and client.base_url == sync_openai(server).base_url


def test_a_chat_stream_is_reported_with_the_usage_of_its_last_chunk(server, workspace):
    with Client(server.url, workspace.key) as quota:
        client = wrap_openai(sync_openai(server), quota)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        assert quota.status().limits["tokens_per_day"].used > 15, "the estimate is held while it streams"
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello there!"
        # The caller did not ask for usage, so it sees no usage chunk.
        assert all(chunk.choices for chunk in chunks)
        assert quota.status().limits["tokens_per_day"].used == 15

        asked = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
            )
        )
        assert asked[-1].usage.total_tokens == 15, "a caller who asked keeps the usage chunk"
        status = quota.status()
        assert status.limits["tokens_per_day"].used == 30
        assert status.limits["requests_per_day"].used == 2


def test_a_responses_stream_is_reported_when_it_ends(server, workspace):
    with Client(server.url, workspace.key) as quota:
        client = wrap_openai(sync_openai(server), quota)
        with client.responses.create(model="gpt-4.1", input="Hi", stream=True) as stream:
            kinds = [event.type for event in stream]
        assert kinds[-1] == "response.completed"
        assert quota.status().limits["tokens_per_day"].used == 11


def test_a_stream_closed_early_is_settled_as_abandoned(server, workspace):
    with Client(server.url, workspace.key) as quota:
        client = wrap_openai(sync_openai(server), quota)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True, max_tokens=10)
        next(stream)
        stream.close()
        status = quota.status()
        assert status.errors.other == 1
        assert status.limits["tokens_per_day"].used == estimate_tokens(
            "chat.completions", {"messages": HELLO, "max_tokens": 10}
        )


def test_a_refused_call_never_reaches_openai(server):
    day = server.workspace(limits={"requests_per_day": 1})
    with Client(server.url, day.key) as quota:
        client = wrap_openai(sync_openai(server), quota)
        client.embeddings.create(model="text-embedding-3-small", input="one")
        before = server.mock_hits("/embeddings")
        with pytest.raises(RefusedError) as refused:
            client.embeddings.create(model="text-embedding-3-small", input="two")
        assert refused.value.code == "daily_limit_exceeded"
        assert server.mock_hits("/embeddings") == before


def test_an_openai_error_is_reported_and_raised(server, workspace):
    with Client(server.url, workspace.key) as quota:
        client = wrap_openai(sync_openai(server), quota)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, extra_query={"mock_scenario": "insufficient_quota"}
            )
        status = quota.status()
        assert status.status == "quota_exceeded"
        assert status.billing_block is not None
        assert status.limits["tokens_per_day"].used == 0
        # The billing block refuses the next call before it reaches OpenAI.
        with pytest.raises(RefusedError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert refused.value.billing_block


def test_the_async_wrapper_reports_calls_and_streams(server, workspace):
    async def scenario():
        async with AsyncClient(server.url, workspace.key) as quota:
            client = wrap_openai(
                openai.AsyncOpenAI(base_url=server.openai_url, api_key="sk-test", max_retries=0), quota
            )
            chat = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            assert chat.usage.total_tokens == 29
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
            chunks = [chunk async for chunk in stream]
            assert all(chunk.choices for chunk in chunks)
            return await quota.status()

    status = asyncio.run(scenario())
    assert status.limits["requests_per_day"].used == 2
    assert status.limits["tokens_per_day"].used == 29 + 15


def test_estimates_cover_the_prompt_and_the_most_output():
    def chat(content, **options):
        return estimate_tokens("chat.completions", {"messages": [{"role": "user", "content": content}], **options})

    assert chat("x" * 400, max_tokens=50) - chat("", max_tokens=50) == 100, "four bytes a token"
    assert chat("", max_tokens=50, n=2) - chat("", max_tokens=50) == 50, "n times the most output"
    assert chat("", max_completion_tokens=9) - chat("", max_tokens=8) == 1
    assert estimate_tokens("responses", {"input": "abcd", "max_output_tokens": 7}) == 2 + 7
    assert estimate_tokens("embeddings", {"input": "abcdefgh"}) == 3
    assert estimate_tokens("chat.completions", {"messages": []}, default_max_tokens=64) == 1 + 64
