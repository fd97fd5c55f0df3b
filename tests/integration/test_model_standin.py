"""The model stand-in speaks the Anthropic Messages API: the real client library drives it."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.error
import urllib.request

import anthropic
import pytest

from rayflow.guest.agents.model_call import call_model
from rayflow.testing.model_standin import ModelStandin

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    with ModelStandin(delay_s=0.3) as running:
        yield running


def test_the_real_client_gets_a_message_back(model):
    client = anthropic.Anthropic(base_url=model.url, api_key="test-key", max_retries=0)
    message = client.messages.create(
        model="claude-standin", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].text.startswith("answer ") and "5 characters" in message.content[0].text
    assert message.usage.output_tokens > 0


def test_a_bad_request_is_a_typed_error_for_the_client(model):
    client = anthropic.Anthropic(base_url=model.url, api_key="test-key", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model="claude-standin", max_tokens=64, messages=[])
    assert raised.value.body["error"]["type"] == "invalid_request_error"


def test_a_request_without_a_key_is_refused(model):
    request = urllib.request.Request(f"{model.url}/v1/messages", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 401
    assert json.loads(raised.value.read())["error"]["type"] == "authentication_error"


def test_concurrent_calls_are_answered_concurrently(model):
    calls_before = model.calls
    with cf.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda i: call_model(model.url, f"prompt {i}"), range(5)))
    assert len(set(answers)) == 5 and model.calls == calls_before + 5
    assert model.peak_in_flight >= 2
