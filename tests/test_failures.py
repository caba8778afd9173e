"""What a member's error means: failures.classify by HTTP status, exception class and shape,
an exhausted quota in each provider's shape, a missing key, a key no header can carry,
Retry-After in its forms, and one_line hiding secrets (issues 4, 10, 20). Pure functions,
tested with the exceptions the SDKs raise."""

import email.utils
import socket

import anthropic
import httpx2
import llm
import openai
import pytest
from conftest import NOW

from llm_loadbalancer.failures import KEY_COOLDOWN, classify, one_line, retry_after


def http_error(status, body=None, headers=None, cls=openai.APIStatusError):
    "The exception an SDK raises for an HTTP error response: its status, JSON body and headers."
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, json=body, request=request)
    message = f"Error code: {status}" if body is None else f"Error code: {status} - {body}"
    return cls(message, response=response, body=body)


@pytest.mark.parametrize(
    "status,failover,cooldown",
    [
        (429, True, 30.0),
        (500, True, 30.0),
        (503, True, 30.0),
        (401, True, KEY_COOLDOWN),
        (403, True, KEY_COOLDOWN),
        (408, True, None),
        (409, True, None),
        (400, False, None),
        (404, True, KEY_COOLDOWN),
        (422, False, None),
    ],
)
def test_http_status_decides(status, failover, cooldown):
    failure = classify(http_error(status), 30.0)
    assert failure.failover is failover
    assert failure.cooldown == cooldown
    assert failure.reason.startswith(str(status))


def test_openai_exception_classes_are_recognised():
    assert classify(http_error(429, cls=openai.RateLimitError), 30).reason == "429 rate limited"
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as inner:
            raise openai.APIConnectionError(request=request) from inner
    except openai.APIConnectionError as ex:
        failure = classify(ex, 12.0)
    assert (failure.reason, failure.failover, failure.cooldown) == (
        "connection refused",
        True,
        12.0,
    )
    timeout = classify(openai.APITimeoutError(request=request), 12.0)
    assert (timeout.reason, timeout.failover) == ("timed out", True)


def test_status_is_read_from_attributes_not_text():
    class ProviderError(Exception):
        def __init__(self):
            super().__init__("the service said 429 but this is a 400")
            self.status_code = 400

    assert classify(ProviderError(), 30).failover is False
    assert classify(ValueError("429 Too Many Requests"), 30).failover is False


def test_shapes_with_status_or_response_status_code():
    class WithStatus(Exception):
        status = 503

    class Resp:
        status_code = 429
        headers = {"retry-after": "4"}

    class WithResponse(Exception):
        response = Resp()

    assert classify(WithStatus(), 30).failover is True
    failure = classify(WithResponse(), 30)
    assert failure.cooldown == 4.0 and failure.stated
    assert failure.reason == "429 rate limited, reset in 4s stated by the provider in retry-after"


def test_missing_key_fails_over_and_cools_down_long():
    failure = classify(llm.NeedsKeyException("No key found"), 30)
    assert (failure.reason, failure.failover, failure.cooldown) == (
        "missing key",
        True,
        KEY_COOLDOWN,
    )


@pytest.mark.parametrize(
    "error",
    [
        http_error(
            429,
            {
                "message": "You exceeded your current quota",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            },
            cls=openai.RateLimitError,
        ),
        http_error(
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "Your credit balance is too low to access the Anthropic API.",
                },
            },
            cls=anthropic.BadRequestError,
        ),
        http_error(  # Gemini's shape (through an OpenAI-compatible endpoint)
            429,
            {
                "error": {
                    "code": 429,
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [
                        {"violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}]}
                    ],
                }
            },
            cls=openai.RateLimitError,
        ),
    ],
    ids=["openai", "anthropic", "gemini"],
)
def test_quota_exhausted_in_each_providers_shape(error):
    failure = classify(error, 30.0, quota_cooldown=3600.0)
    assert failure.reason.endswith("quota exhausted")
    assert (failure.failover, failure.cooldown, failure.stated) == (True, 3600.0, True)


def test_a_plain_rate_limit_is_not_a_quota():
    error = http_error(429, {"error": {"message": "Rate limit reached"}}, cls=openai.RateLimitError)
    assert classify(error, 30.0).reason == "429 rate limited"
    error = http_error(400, {"error": {"message": "bad request"}}, cls=anthropic.BadRequestError)
    assert classify(error, 30.0).failover is False


def test_retry_after_forms():
    assert retry_after(http_error(429, headers={"retry-after": "7"})) == 7.0
    assert retry_after(http_error(429, headers={"retry-after-ms": "1500"})) == 1.5
    date = email.utils.formatdate(NOW + 20, usegmt=True)
    assert retry_after(http_error(429, headers={"retry-after": date}), now=NOW) == pytest.approx(
        20, abs=1
    )
    assert retry_after(http_error(429)) is None
    assert classify(http_error(429, headers={"retry-after": "7"}), 30).cooldown == 7.0


def test_one_line_hides_secrets_and_stays_short():
    ex = RuntimeError("Incorrect API key provided: sk-secret-123\nmore detail")
    assert one_line(ex, secrets=["sk-secret-123"]) == "Incorrect API key provided: ***"
    assert len(one_line(RuntimeError("x" * 500))) == 200


def refused(sdk, key):
    """The exception an SDK raises when its HTTP client, connected (to a socket that listens
    and never answers), refuses to send ``key`` in a header."""
    listening = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    client = sdk(api_key=key, base_url=url, max_retries=0)
    with listening, pytest.raises(Exception) as caught:
        if sdk is anthropic.Anthropic:
            client.messages.create(model="m", max_tokens=1, messages=[])
        else:
            client.chat.completions.create(model="m", messages=[])
    return caught.value


@pytest.mark.parametrize(
    "sdk,key",
    [
        (openai.OpenAI, "sk-secret-123\n"),
        (openai.OpenAI, "sk-secret-123\r\nsk-secret-456"),
        (openai.OpenAI, "sk-secret-123 "),
        (openai.OpenAI, "sk-secret-\x00123"),
        (openai.OpenAI, "sk-secret-é123"),
        (anthropic.Anthropic, "sk-secret-123\nsk-secret-456"),
    ],
    ids=["newline", "two-lines", "space", "nul", "not-ascii", "anthropic"],
)
def test_a_key_no_header_can_carry_is_a_bad_key_never_shown(sdk, key):
    error = refused(sdk, key)  # openai's APIConnectionError from httpx's LocalProtocolError
    failure = classify(error, 30.0)
    assert (failure.reason, failure.failover, failure.cooldown) == ("bad key", True, KEY_COOLDOWN)
    line = one_line(error, secrets=[key])
    assert line.startswith("the HTTP client refused to send a header: its value (not shown")
    assert "secret" not in one_line(error) and "secret" not in line


def test_an_encoding_error_outside_httpx_headers_is_not_a_bad_key():
    # another HTTP client's header (http.client, under requests), or a plugin's own helper
    # named for headers: the error as it is, not a key to cool down for 10 minutes
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", 9)
    connection.putrequest("POST", "/v1/chat")
    with pytest.raises(UnicodeEncodeError) as other_client:
        connection.putheader("X-Title", "résumé – naïve ✓")

    def render_header_line(text):
        return text.encode("ascii")

    with pytest.raises(UnicodeEncodeError) as own_helper:
        render_header_line("Überschrift")
    for error in (other_client.value, own_helper.value):
        assert classify(error, 30.0).reason == "error"


def test_one_line_hides_a_secret_escaped_or_broken_over_lines():
    key = "sk-secret-123\nsk-secret-456"
    escaped = RuntimeError("Invalid header value b'Bearer sk-secret-123\\nsk-secret-456'")
    assert one_line(escaped, secrets=[key]) == "Invalid header value b'Bearer ***'"
    raw = RuntimeError(f"Incorrect API key provided: {key}")
    assert one_line(raw, secrets=[key]) == "Incorrect API key provided: ***"
