"""What a prompt will cost a member's token limits, estimated before it is sent (issue 21):
``estimates.py`` reads llm's own prompt objects; ``limits.token_room`` and ``free_at`` decide
with the reservations of prompts in flight; ``rules.reserved``, ``history`` and ``spent`` read
and write what the store keeps. Pure functions, with an injected clock. What the stores keep
is in test_store.py; the behaviour across processes through llm's OpenAI plugin, in
test_limits.py."""

import llm
import pytest
from conftest import NOW

from llm_loadbalancer import estimates, limits, speed
from llm_loadbalancer.estimates import History, Need
from llm_loadbalancer.limits import Reserved
from llm_loadbalancer.store import Outcome, rules
from llm_loadbalancer.store.sqlite import Ticket

# --- the input ---------------------------------------------------------------------------------


def test_text_counts_one_token_per_three_bytes_of_utf8():
    assert estimates.text_tokens("") == 0
    assert estimates.text_tokens("abc") == 1
    assert estimates.text_tokens("abcd") == 2
    assert estimates.text_tokens("日本語") == 3  # 9 bytes
    assert estimates.text_tokens("a" * 3000) == 1000


def test_a_prompt_counts_its_system_prompt_fragments_and_text(user_path):
    model = llm.get_model("echo")
    prompt = llm.Prompt(
        "question",
        model,
        system="be brief",
        system_fragments=["x" * 300],
        fragments=["y" * 600],
    )
    # system: 300 + 2 + 8 bytes; user: 600 + 1 + 8; and 4 a message
    expected = -(-310 // 3) + -(-609 // 3) + 2 * estimates.MESSAGE_TOKENS
    assert estimates.prompt_tokens(prompt) == expected


def test_a_conversation_counts_its_earlier_turns(user_path):
    model = llm.get_model("echo")
    conversation = model.conversation()
    conversation.prompt("first " * 100).text()
    later = conversation.prompt("second")
    alone = estimates.prompt_tokens(llm.Prompt("second", model))
    assert estimates.prompt_tokens(later.prompt) > alone + 200  # the first turn, and its answer
    # (the estimate reads the chain llm gave the prompt as it is given: what its property says)
    assert speed.prompt_messages(later.prompt) == later.prompt.messages
    assert len(later.prompt.messages) == 3


def test_attachments_images_and_other_files(tmp_path):
    assert estimates.attachment_tokens("image/png", 5_000_000) == estimates.ATTACHMENT_TOKENS
    assert estimates.attachment_tokens("application/pdf", 30_000) == 10_000
    assert estimates.attachment_tokens(None, None) == estimates.ATTACHMENT_TOKENS  # a URL
    path = tmp_path / "notes.txt"
    path.write_text("z" * 900)
    model = llm.get_model("echo")
    prompt = llm.Prompt("", model, attachments=[llm.Attachment(type="text/plain", path=str(path))])
    assert estimates.prompt_tokens(prompt) == estimates.MESSAGE_TOKENS + 300


def test_tools_and_a_schema_count(user_path):
    model = llm.get_model("echo")

    def lookup(place: str) -> str:
        "Look a place up."
        return place

    plain = estimates.prompt_tokens(llm.Prompt("hi", model))
    assert estimates.prompt_tokens(llm.Prompt("hi", model, tools=[lookup])) > plain + 10
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert estimates.prompt_tokens(llm.Prompt("hi", model, schema=schema)) > plain + 10


@pytest.mark.parametrize(
    "options, cap",
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_output_tokens": "250"}, 250),
        ({"num_predict": 64.5}, 65),
        ({"max_tokens": 0}, None),
        ({"max_tokens": -1}, None),
        ({"max_tokens": True}, None),
        ({"max_tokens": "lots"}, None),
        ({"max_tokens": float("inf")}, None),
        ({"temperature": 0.5}, None),
    ],
)
def test_the_cap_on_an_answer_is_read_from_the_options_plugins_use(options, cap):
    assert estimates.output_cap(options) == cap


# --- the estimate ------------------------------------------------------------------------------


def test_the_answer_is_the_cap_else_the_largest_recent_one_else_unknown():
    assert estimates.need(50, 100, History()) == Need(150, False, 50)
    assert estimates.need(50, None, History(output=80)) == Need(130, False, 50)
    assert estimates.need(50, None, History()) == Need(50, True, 50)
    # what recent reports' input exceeded their estimates is added
    assert estimates.need(50, 100, History(output=80, missed=30)) == Need(180, False, 50)


def test_history_reads_the_last_reports_of_the_day_that_were_estimated():
    reports = [  # (at, tokens, estimate, output), newest first
        (NOW - 1, 100, 40, 50),  # missed 10
        (NOW - 2, 300, 20, 30),  # missed 250
        (NOW - 3, 999, None, None),  # a reservation kept without a report
        (NOW - 90000, 5000, 10, 4000),  # more than a day ago
    ]
    assert rules.history(reports, NOW) == History(output=50, missed=250)
    assert rules.history([], NOW) == History()
    many = [(NOW - i, 10, 10, 0) for i in range(rules.RECENT_REPORTS)] + [(NOW - 99, 900, 0, 900)]
    assert rules.history(many, NOW) == History(output=0, missed=0)  # the 21st is not read


def test_reservations_count_while_their_lease_lasts():
    entries = [  # (tokens, blind, at, lease)
        (100, False, NOW - 10, NOW + 35),
        (50, True, NOW - 5, NOW + 40),
        (70, False, NOW - 100, NOW - 1),  # its lease ended: its process died
        (90, False, NOW - 10, NOW + 3 * rules.LEASE),  # before the clock was set back
        (80, False, NOW - 4000, NOW + 10),  # in flight for over an hour
    ]
    assert rules.reserved(entries, NOW) == Reserved(240, 3, 1)


def test_what_an_attempt_leaves_in_its_windows():
    ticket = Ticket(True, None, 7, reserved=120, estimate=20)
    assert rules.spent(Outcome(tokens_in=25, tokens_out=80), ticket) == (105, 20, 80)
    assert rules.spent(Outcome(), ticket) == (120, None, None)  # no report: the estimate stays
    cut = Outcome(error="connection: cut", first_chunk=0.2)
    assert rules.spent(cut, ticket) == (120, None, None)
    assert rules.spent(Outcome(error="429 rate limited: x"), ticket) == (0, None, None)
    unreserved = Ticket(True)
    assert rules.spent(Outcome(tokens_in=5, tokens_out=5), unreserved) == (10, None, None)
    assert rules.spent(Outcome(), unreserved) == (0, None, None)


# --- room under a token limit --------------------------------------------------------------


@pytest.mark.parametrize(
    "used, reserved, need, room",
    [
        (0, Reserved(), Need(500, False, 500), True),  # alone: even above the limit
        (0, Reserved(), Need(5, True, 5), True),
        (100, Reserved(), Need(200, False, 10), True),  # 300: fits exactly
        (100, Reserved(), Need(201, False, 10), False),
        (100, Reserved(100, 1, 0), Need(100, False, 10), True),
        (100, Reserved(100, 1, 0), Need(101, False, 10), False),
        (0, Reserved(10, 1, 1), Need(1, False, 1), False),  # an unknown answer is in flight
        (0, Reserved(10, 1, 0), Need(5, True, 5), False),  # an unknown answer goes alone
        (100, Reserved(), Need(150, True, 150), True),
        (100, Reserved(), Need(201, True, 201), False),
        (299, Reserved(), None, True),  # no estimate: a token at least
        (300, Reserved(), None, False),
    ],
)
def test_token_room(used, reserved, need, room):
    assert limits.token_room(300, used, reserved, need) is room


def test_free_at_waits_for_reports_to_age_out_or_looks_again_while_prompts_run():
    spent = [(NOW - 50, 200), (NOW - 20, 100)]
    need = Need(100, False, 10)
    # 300 used: room for 100 when the first report leaves the window
    assert limits.free_at({"tpm": 300}, spent, NOW, Reserved(), need) == NOW + 10
    # prompts in flight could not make room sooner: the same
    held = Reserved(50, 1, 0)
    assert limits.free_at({"tpm": 300}, spent, NOW, held, need) == NOW + 10
    # they could (when they end is not known): look again shortly
    one = [(NOW - 50, 100)]
    assert limits.free_at({"tpm": 300}, one, NOW, Reserved(150, 1, 0), need) == NOW + limits.POLL
    assert limits.free_at({"tpm": 300}, [], NOW, Reserved(10, 1, 1), need) == NOW + limits.POLL
    assert limits.free_at({"tpm": 1000}, spent, NOW, held, need) is None

