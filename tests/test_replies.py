"""ReplyLog: an earlier reply sent back in the history goes to the engine as the tokens that were sampled."""

from __future__ import annotations

from pathlib import Path

import pytest

from art_sglang.chat import ChatTemplate
from art_sglang.gateway.replies import ReplyLog

TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools_reasoning.jinja"


@pytest.fixture(scope="module")
def template(model_path):
    return ChatTemplate.load(model_path, str(TEMPLATE))


def test_a_reply_sent_back_extends_the_prompt_token_for_token(template):
    log = ReplyLog(template)
    tok = template.tokenizer
    first = [{"role": "user", "content": "2 + 3?"}]
    p1 = log.build(first, None)
    assert p1.ids == template.render(first, add_generation_prompt=True) and p1.parent is None
    # Sampled: reasoning the template drops from history, and "5" split in a way re-tokenizing would not give.
    sampled = tok.encode("<think>add them</think>\n") + [tok.convert_tokens_to_ids("5")] + [tok.eos_token_id]
    reply = {"role": "assistant", "content": "<think>add them</think>\n5"}
    log.record(p1, reply, sampled)
    second = [*first, reply, {"role": "user", "content": "And 4 + 4?"}]
    p2 = log.build(second, None)
    assert p2.ids[: len(p1.ids) + len(sampled)] == p1.ids + sampled
    assert p2.ids != template.render(second, add_generation_prompt=True)  # what re-rendering would have sent
    assert tok.decode(p2.ids[len(p1.ids) + len(sampled) :]).startswith("\n<|im_start|>user\nAnd 4 + 4?")
    # A client that changes the reply gets the template's rendering: no stale tokens.
    edited = [*first, {"role": "assistant", "content": "5"}, second[-1]]
    assert log.build(edited, None).parent is None


def test_tool_calls_are_known_by_their_ids_and_arguments_not_their_spelling(template):
    log = ReplyLog(template)
    tok = template.tokenizer
    q = [{"role": "user", "content": "2 + 3?"}]
    p1 = log.build(q, None)
    for call_id in ("call_a", "call_b"):  # two samples, the same call written with other tokens
        sampled = tok.encode(f'<tool_call>{{"name":"add","arguments":{{"a":2,"b":3}}}}</tool_call>{call_id}')
        call = {"id": call_id, "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}
        log.record(p1, {"role": "assistant", "content": "", "tool_calls": [call]}, sampled)
    back = {  # as a client sends it: arguments re-serialized, with other spacing
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
        ],
    }
    p2 = log.build([*q, back, {"role": "tool", "tool_call_id": "call_a", "content": "5"}], None)
    assert tok.decode(p2.ids[len(p1.ids) :]).startswith(
        '<tool_call>{"name":"add","arguments":{"a":2,"b":3}}</tool_call>call_a'
    )


def test_the_log_is_bounded_least_recently_used_first(template):
    log = ReplyLog(template, max_tokens=100)
    for i in range(50):
        prompt = log.build([{"role": "user", "content": f"question {i}"}], None)
        log.record(prompt, {"role": "assistant", "content": f"answer {i}"}, [1, 2, 3])
    assert log._tokens <= 100 and len(log) < 50


def test_replies_with_one_answer_and_other_reasoning_are_two_replies(template):
    """With a reasoning parser, a reply's reasoning comes back in `reasoning_content`: two group samples that answer
    alike but reasoned otherwise must each get their own tokens as the next turn's history."""
    log = ReplyLog(template)
    tok = template.tokenizer
    q = [{"role": "user", "content": "2 + 3?"}]
    p1 = log.build(q, None)
    for thought in ("add them", "count up"):
        sampled = tok.encode(f"<think>{thought}</think>\n5") + [tok.eos_token_id]
        log.record(p1, {"role": "assistant", "content": "5", "reasoning_content": thought}, sampled)
    for thought in ("add them", "count up"):
        back = {"role": "assistant", "content": "5", "reasoning_content": thought}
        p2 = log.build([*q, back, {"role": "user", "content": "And 4 + 4?"}], None)
        assert tok.decode(p2.ids[len(p1.ids) :]).startswith(f"<think>{thought}</think>\n5"), thought
    # A client that drops the reasoning sends another message: rendered by the template, not a sample's tokens.
    assert log.build([*q, {"role": "assistant", "content": "5"}, {"role": "user", "content": "?"}], None).parent is None
