"""Resets the provider states when it refuses a request (issue 21, part 2): read from the
errors the openai and anthropic SDKs raise (``resets.py``, pure, with the time given), then,
through llm's OpenAI plugin and llm-anthropic to the local servers, a member is skipped until
then by later processes, and ``llm lb stats`` says when and where it was stated."""

import datetime
import email.utils
import json
import re
import time

import anthropic
import httpx2
import openai
import pytest
from conftest import NOW, invoke, llm_process, save_lb

from llm_loadbalancer import config, resets
from llm_loadbalancer.failures import classify


def error(status=429, body=None, headers=None, cls=openai.RateLimitError, message=None):
    "The exception an SDK raises for an HTTP error response: its status, body and headers."
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, json=body, request=request)
    return cls(message or f"Error code: {status} - {body}", response=response, body=body)


def rfc3339(seconds_from_now: float) -> str:
    when = datetime.datetime.fromtimestamp(NOW + seconds_from_now, datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spent(kind: str, reset: str) -> dict:
    "OpenAI's headers for a limit with nothing left: requests or tokens."
    return {f"x-ratelimit-reset-{kind}": reset, f"x-ratelimit-remaining-{kind}": "0"}


def anthropic_spent(reset: str) -> dict:
    return {
        "anthropic-ratelimit-tokens-reset": reset,
        "anthropic-ratelimit-tokens-remaining": "0",
    }


def stated(ex):
    found = resets.stated(ex, NOW)
    return None if found is None else (round(found.seconds, 3), found.source)


# --- every form, from the SDKs' own errors ---------------------------------------------------


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"retry-after": "7"}, (7.0, "retry-after")),
        ({"retry-after-ms": "1500", "retry-after": "9"}, (1.5, "retry-after-ms")),
        ({"retry-after": email.utils.formatdate(NOW + 20, usegmt=True)}, (20.0, "retry-after")),
        (spent("requests", "1s"), (1.0, "x-ratelimit-reset-requests")),
        (spent("tokens", "6m0s"), (360.0, "x-ratelimit-reset-tokens")),
        (spent("tokens", "1m26.4s"), (86.4, "x-ratelimit-reset-tokens")),
        (spent("requests", "20ms"), (0.02, "x-ratelimit-reset-requests")),
        (spent("requests", "1h2m3.5s"), (3723.5, "x-ratelimit-reset-requests")),
        # the limit with nothing left is the one that refused, whichever resets later
        (
            {
                "x-ratelimit-reset-requests": "8h38m",
                "x-ratelimit-remaining-requests": "120",
                "x-ratelimit-reset-tokens": "7.5s",
                "x-ratelimit-remaining-tokens": "0",
            },
            (7.5, "x-ratelimit-reset-tokens"),
        ),
        # both spent: the latest, before which a request is known to be refused
        (
            {**spent("requests", "2s"), **spent("tokens", "30s")},
            (30.0, "x-ratelimit-reset-tokens"),
        ),
        (
            {
                "anthropic-ratelimit-requests-reset": rfc3339(3),
                "anthropic-ratelimit-requests-remaining": "40",
                "anthropic-ratelimit-input-tokens-reset": rfc3339(95.5),
                "anthropic-ratelimit-input-tokens-remaining": "0",
            },
            (95.5, "anthropic-ratelimit-input-tokens-reset"),
        ),
        (
            {
                "anthropic-ratelimit-output-tokens-reset": "2026-12-06T10:00:00+01:00",
                "anthropic-ratelimit-output-tokens-remaining": "0",
            },
            (
                datetime.datetime.fromisoformat("2026-12-06T10:00:00+01:00").timestamp() - NOW,
                "anthropic-ratelimit-output-tokens-reset",
            ),
        ),
        # Retry-After says when to try again: it comes first
        ({"retry-after": "4", **spent("tokens", "6m0s")}, (4.0, "retry-after")),
    ],
)
def test_headers_of_each_provider(headers, expected):
    assert NOW < datetime.datetime.fromisoformat("2026-12-06T10:00:00+01:00").timestamp()
    seconds, source = expected
    found = stated(error(headers=headers))
    assert found[1] == source
    assert found[0] == pytest.approx(min(max(seconds, 0), config.MAX_STATED_SECONDS), abs=0.01)


def test_an_anthropic_sdk_error_with_its_reset_headers():
    request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    headers = {
        "retry-after": "12",
        "anthropic-ratelimit-tokens-reset": rfc3339(40),
        "anthropic-ratelimit-tokens-remaining": "0",
    }
    response = httpx2.Response(429, headers=headers, request=request)
    ex = anthropic.RateLimitError("rate_limit_error", response=response, body=None)
    assert stated(ex) == (12.0, "retry-after")
    del response.headers["retry-after"]
    assert stated(ex)[1] == "anthropic-ratelimit-tokens-reset"


GEMINI_DETAIL = {
    "error": {
        "code": 429,
        "message": "You exceeded your current quota. Please retry in 37.1s.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
        ],
    }
}


def test_geminis_retry_info_in_its_body_a_list_of_one_object():
    assert stated(error(body=[GEMINI_DETAIL])) == (37.0, "retryDelay")


def test_geminis_retry_info_in_the_message_as_pythons_repr():
    # openai 1.x puts the list body in the message as Python's repr (and in .body); a plugin
    # that raises its own error with that text keeps only the message
    ex = RuntimeError(f"Error code: 429 - {[GEMINI_DETAIL]!r}")
    assert stated(ex) == (37.0, "retryDelay")


@pytest.mark.parametrize(
    "message,seconds",
    [
        (
            "Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): "
            "Limit 200000, Used 199000, Requested 2000. Please try again in 7m54.336s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            474.336,
        ),
        ("Rate limit reached for model llama-3.1 (TPD). Please try again in 2h1m3.5s.", 7263.5),
        ("Please try again in 120ms.", 0.12),
        ("Resource has been exhausted. Please retry in 5.25s.", 5.25),
    ],
)
def test_the_message_where_the_provider_says_it_there(message, seconds):
    ex = error(body={"error": {"message": message, "type": "tokens"}}, message=message)
    assert stated(ex) == (seconds, "the message")


def test_the_reset_is_found_along_the_cause_chain():
    try:
        try:
            raise error(headers=spent("tokens", "3s"))
        except openai.RateLimitError as ex:
            raise RuntimeError("wrapped by a plugin") from ex
    except RuntimeError as outer:
        assert stated(outer) == (3.0, "x-ratelimit-reset-tokens")


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "0"}, (0.0, "retry-after")),
        (
            {"retry-after": "Mon, 01 Jan 9999 00:00:00 -0000"},
            (config.MAX_STATED_SECONDS, "retry-after"),
        ),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:00 -0000"}, None),
        ({"retry-after": "1e300"}, (config.MAX_STATED_SECONDS, "retry-after")),
        ({"retry-after-ms": "nan", "retry-after": "7"}, None),
        (
            spent("tokens", "999999h"),
            (config.MAX_STATED_SECONDS, "x-ratelimit-reset-tokens"),
        ),
        (spent("tokens", "-3s"), None),
        (spent("tokens", "6m0"), None),
        (spent("tokens", "1" * 400 + "s"), None),
        (anthropic_spent("yesterday"), None),
        (anthropic_spent("2026-13-45T99:99:99Z"), None),
        (anthropic_spent("1970-01-01T00:00:00Z"), None),
        (
            anthropic_spent("9999-12-31T23:59:59Z"),
            (config.MAX_STATED_SECONDS, "anthropic-ratelimit-tokens-reset"),
        ),
    ],
)
def test_hostile_values_never_crash_and_never_keep_a_member_past_a_week(headers, expected):
    assert stated(error(headers=headers)) == expected


def test_a_limit_with_some_left_did_not_refuse_the_request():
    # OpenAI's reset headers say when each limit is full again: the requests' limit, with 150
    # left, is full in 7 hours; the tokens' limit refused this one, as the message says
    headers = {
        "x-ratelimit-remaining-requests": "150",
        "x-ratelimit-reset-requests": "7h12m",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "1.2s",
    }
    message = "Rate limit reached on tokens per min (TPM). Please try again in 1.2s."
    ex = error(headers=headers, body={"error": {"message": message}}, message=message)
    assert stated(ex) == (1.2, "the message")
    assert stated(error(headers=headers)) is None


def test_no_reset_stated():
    assert stated(error()) is None
    assert stated(error(body={"error": {"message": "Rate limit reached"}})) is None
    assert stated(ValueError("try again later")) is None


def test_durations_are_shown_as_people_write_them():
    seconds = (0.02, 0.5, 37, 474.336, 3600, 3601, 7500, 86401, 90061, 604800)
    shown = [resets.shown(s) for s in seconds]
    assert shown == ["0s", "0.5s", "37s", "7m55s", "1h", "1h", "2h5m", "1d", "1d1h", "7d"]


# --- what the balancer makes of them ---------------------------------------------------------


def test_a_stated_reset_is_the_cooldown_and_the_reason_says_where_it_came_from():
    failure = classify(error(headers=spent("tokens", "6m0s")), 30.0, now=NOW)
    assert (failure.cooldown, failure.stated, failure.exact) == (360.0, True, True)
    assert failure.reason == (
        "429 rate limited, reset in 6m stated by the provider in x-ratelimit-reset-tokens"
    )
    plain = classify(error(), 30.0, now=NOW)  # none stated: the balancer's doubling cooldown
    assert (plain.reason, plain.cooldown, plain.stated) == ("429 rate limited", 30.0, False)
    # a 5xx's Retry-After is waited for, and doubles if the member fails right after it
    server = classify(error(503, headers={"retry-after": "20"}, cls=openai.APIStatusError), 30.0)
    assert (server.cooldown, server.stated, server.exact) == (20.0, True, False)


def test_a_spent_quota_waits_for_its_stated_reset_when_later_than_quota_cooldown():
    body = {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}
    failure = classify(
        error(body=body, headers=spent("requests", "2h")), 30.0, quota_cooldown=3600.0, now=NOW
    )
    assert (failure.cooldown, failure.stated, failure.exact) == (7200.0, True, True)
    assert failure.reason == (
        "429 quota exhausted, reset in 2h stated by the provider in x-ratelimit-reset-requests"
    )
    # none stated, or one sooner than quota_cooldown (Gemini's retryDelay for a spent daily
    # quota is a hint to retry, not the quota's end): quota_cooldown
    daily = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "Quota exceeded for GenerateRequestsPerDayPerProjectPerModel",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "38s"}],
        }
    }
    for body in (body, daily):
        failure = classify(error(body=body), 30.0, quota_cooldown=3600.0, now=NOW)
        assert (failure.reason, failure.cooldown, failure.stated, failure.exact) == (
            "429 quota exhausted",
            3600.0,
            True,
            False,
        )


# --- through llm's plugins, over HTTP ------------------------------------------------------


def member_stats(name: str, index: int = 0) -> dict:
    result = invoke("lb", "stats", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)[0]["members"][index]


@pytest.mark.parametrize(
    "headers,message,body,seconds,source",
    [
        (
            {"x-ratelimit-reset-tokens": "7m54s", "x-ratelimit-remaining-tokens": "0"},
            None,
            None,
            474,
            "x-ratelimit-reset-tokens",
        ),
        ({}, "Please try again in 2m30.5s.", None, 150.5, "the message"),
        ({}, None, [GEMINI_DETAIL], 37, "retryDelay"),
        ({"retry-after": "3600"}, None, None, 3600, "retry-after"),
    ],
    ids=["openai-headers", "message", "gemini-list-body", "retry-after"],
)
def test_through_llms_openai_plugin_the_member_is_skipped_until_the_stated_reset(
    local_openai, headers, message, body, seconds, source
):
    save_lb("r", "local-a", "local-b")
    local_openai.error_headers = headers
    local_openai.error_message = message
    local_openai.error_body = body
    local_openai.fail("429", endpoint="a", times=1)
    before = time.time()
    result = invoke("-m", "lb:r", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "answer from b with sk-b"
    member = member_stats("r")
    assert before + seconds - 2 <= member["cooling_down_until"] <= time.time() + seconds + 2
    assert member["cooling_down_for"].endswith(f"stated by the provider in {source}")
    # the next prompt is b's turn anyway; the one after is a's, which a later process skips
    assert invoke("-m", "lb:r", "hi").stdout.strip() == "answer from b with sk-b"
    assert llm_process("-m", "lb:r", "hi").stdout.strip() == "answer from b with sk-b"
    assert local_openai.seen("endpoint") == ["a", "b", "b", "b"]
    shown = invoke("lb", "stats", "r").stdout
    assert f"stated by the provider in {source}" in shown


def test_through_llm_anthropic_its_reset_headers_keep_the_member_out(local_anthropic):
    save_lb("ra", "claude-haiku-4.5 key=ant-work", "claude-haiku-4.5 key=ant-personal")
    local_anthropic.error_headers = {
        "anthropic-ratelimit-output-tokens-reset": (
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=600)
        )
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "anthropic-ratelimit-output-tokens-remaining": "0",
    }
    local_anthropic.fail("429", key="sk-ant-work", times=1)
    before = time.time()
    first = invoke("-m", "lb:ra", "hi")
    assert first.exit_code == 0, first.output
    member = member_stats("ra")
    assert before + 598 <= member["cooling_down_until"] <= time.time() + 602
    assert re.fullmatch(  # (the date was set before the request: a second or two may pass)
        r"429 rate limited, reset in (10m|9m\d+s) stated by the provider in "
        r"anthropic-ratelimit-output-tokens-reset",
        member["cooling_down_for"],
    ), member["cooling_down_for"]
    invoke("-m", "lb:ra", "hi")
    assert local_anthropic.seen("key") == ["sk-ant-work", "sk-ant-personal", "sk-ant-personal"]
