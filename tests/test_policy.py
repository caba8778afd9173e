"""Pure decisions: which member goes first, and what a member's error means (issues 3, 4)."""

import email.utils

import httpx2
import llm
import openai
import pytest

from llm_loadbalancer.failures import KEY_COOLDOWN, classify, one_line, retry_after
from llm_loadbalancer.policy import plan

NOW = 1_000_000.0


def test_roundrobin_starts_at_the_position_and_moves_on():
    result = plan("roundrobin", 3, 1, {}, NOW)
    assert result.order == (1, 2, 0)
    assert result.position == 2
    assert plan("roundrobin", 3, 2, {}, NOW).position == 0


def test_roundrobin_skips_members_cooling_down():
    result = plan("roundrobin", 3, 0, {0: NOW + 10}, NOW)
    assert result.order == (1, 2)
    assert result.skipped == (0,)
    assert result.position == 2
    # an ended cooldown no longer counts
    assert plan("roundrobin", 3, 0, {0: NOW - 1}, NOW).order == (0, 1, 2)


def test_every_member_cooling_down_is_still_tried_soonest_first():
    result = plan("roundrobin", 3, 0, {0: NOW + 30, 1: NOW + 5, 2: NOW + 10}, NOW)
    assert result.order == (1, 2, 0)
    assert result.skipped == ()


def test_failover_policy_always_starts_at_the_first_member():
    assert plan("failover", 3, 2, {}, NOW).order == (0, 1, 2)
    assert plan("failover", 3, 0, {0: NOW + 5}, NOW).order == (1, 2)
    # back to the primary once its cooldown is over
    assert plan("failover", 3, 0, {0: NOW - 5}, NOW).order == (0, 1, 2)


def test_pinned_member_answers_alone_and_the_rotation_stays():
    result = plan("roundrobin", 3, 0, {2: NOW + 10}, NOW, pinned=2)
    assert result.order == (2,)
    assert result.position == 0


def test_preferred_member_goes_first_unless_cooling_down():
    result = plan("roundrobin", 3, 0, {}, NOW, preferred=2)
    assert result.order == (2, 0, 1)
    assert result.position == 0
    assert plan("roundrobin", 3, 0, {2: NOW + 1}, NOW, preferred=2).order == (0, 1)


def status_error(status, headers=None, cls=openai.APIStatusError):
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return cls(f"Error code: {status}", response=response, body=None)


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
    failure = classify(status_error(status), 30.0)
    assert failure.failover is failover
    assert failure.cooldown == cooldown
    assert failure.reason.startswith(str(status))


def test_openai_exception_classes_are_recognised():
    assert classify(status_error(429, cls=openai.RateLimitError), 30).reason == "429 rate limited"
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
    assert failure.reason == "429 rate limited" and failure.cooldown == 4.0


def test_missing_key_fails_over_and_cools_down_long():
    failure = classify(llm.NeedsKeyException("No key found"), 30)
    assert (failure.reason, failure.failover, failure.cooldown) == (
        "missing key",
        True,
        KEY_COOLDOWN,
    )


def test_retry_after_forms():
    assert retry_after(status_error(429, {"retry-after": "7"})) == 7.0
    assert retry_after(status_error(429, {"retry-after-ms": "1500"})) == 1.5
    date = email.utils.formatdate(NOW + 20, usegmt=True)
    assert retry_after(status_error(429, {"retry-after": date}), now=NOW) == pytest.approx(
        20, abs=1
    )
    assert retry_after(status_error(429)) is None
    assert classify(status_error(429, {"retry-after": "7"}), 30).cooldown == 7.0


def test_one_line_hides_secrets_and_stays_short():
    ex = RuntimeError("Incorrect API key provided: sk-secret-123\nmore detail")
    assert one_line(ex, secrets=["sk-secret-123"]) == "Incorrect API key provided: ***"
    assert len(one_line(RuntimeError("x" * 500))) == 200
