"""Drives quotawatch's /v1 proxy with the official `openai` Python package.

Run by tests/it/sdk.rs, which starts quotawatch and the mock upstream and
passes their addresses in the environment. Every check raises on failure;
the last line printed is a JSON summary the Rust test reads.
"""

import json
import os
import time
import urllib.request

import openai

BASE_URL = os.environ["QW_BASE_URL"]
MOCK_URL = os.environ["QW_MOCK_URL"]


def client(key, **options):
    return openai.OpenAI(base_url=BASE_URL, api_key=key, **options)


def mock_hits(path):
    with urllib.request.urlopen(f"{MOCK_URL}/mock/stats") as response:
        return json.load(response)["requests"].get(path, 0)


def check_counted_calls(sdk):
    chat = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], max_tokens=20
    )
    assert chat.choices[0].message.content == "Hello! How can I help you today?", chat
    assert chat.usage.total_tokens == 29

    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there!", text
    # The client did not ask for usage, so it sees none.
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "no extra usage chunk"

    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Say hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.total_tokens == 15, chunks[-1]

    embeddings = sdk.embeddings.create(model="text-embedding-3-small", input="Hello")
    assert embeddings.usage.total_tokens == 8

    response = sdk.responses.create(model="gpt-4.1", input="Hi")
    assert response.output_text == "Hi!", response
    assert response.usage.total_tokens == 11


def check_local_limit(key):
    tight = client(key)
    tight.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one"}])
    started = time.monotonic()
    try:
        tight.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "two"}])
    except openai.RateLimitError as error:
        message = error.body["message"]
        assert "Workspace tight" in message and "requests_per_day" in message, message
        assert error.response.headers["x-should-retry"] == "false"
    else:
        raise AssertionError("the second call should have been refused")
    # x-should-retry: false: the SDK raised without its retries and back-off.
    return time.monotonic() - started


def check_billing(key):
    before = mock_hits("/chat/completions")
    billing = client(key)
    started = time.monotonic()
    try:
        billing.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
            extra_query={"mock_scenario": "insufficient_quota"},
        )
    except openai.RateLimitError as error:
        assert error.code == "insufficient_quota", error.code
    else:
        raise AssertionError("the billing error should reach the SDK")
    elapsed = time.monotonic() - started
    hits = mock_hits("/chat/completions") - before
    assert hits == 1, f"the SDK retried a billing error: {hits} upstream hits"
    # Now blocked locally: refused at once, without reaching the upstream.
    try:
        billing.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}])
    except openai.RateLimitError as error:
        assert "insufficient_quota" in error.body["message"], error.body
    else:
        raise AssertionError("the blocked workspace should be refused")
    assert mock_hits("/chat/completions") - before == 1
    return elapsed


def main():
    check_counted_calls(client(os.environ["QW_KEY"]))
    refused_after = check_local_limit(os.environ["QW_TIGHT_KEY"])
    billing_after = check_billing(os.environ["QW_BILLING_KEY"])
    print(json.dumps({"ok": True, "refused_after_s": refused_after, "billing_after_s": billing_after, "openai": openai.__version__}))


if __name__ == "__main__":
    main()
