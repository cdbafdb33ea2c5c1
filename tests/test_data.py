"""Trajectories to training sequences: exact sampled tokens, masks, advantages, and every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import art
import pytest
from art_compat import History
from trajectories import answer_ids, choice, trajectory

from art_sglang import TrajectoryError
from art_sglang.chat import ChatTemplate
from art_sglang.trainer.data import advantages, balance, prepare


@pytest.fixture(scope="module")
def template(model_path):
    return ChatTemplate.load(model_path)


@pytest.fixture(scope="module")
def tok(template):
    return template.tokenizer


def prompt_ids(tok, messages, tools=None) -> list[int]:
    return list(
        tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def test_single_turn_is_prompt_plus_exact_sampled_ids(tok, template):
    ids = answer_ids(tok, "Paris")
    t = trajectory(tok, "Capital of France?", "Paris", 1.0, logprobs=[-0.1] * len(ids))
    other = trajectory(tok, "Capital of France?", "Lyon", 0.0)
    out = prepare([art.TrajectoryGroup([t, other])], template)
    seq = out.sequences[0]
    prompt = prompt_ids(tok, [{"role": "user", "content": "Capital of France?"}])
    assert seq.token_ids == prompt + ids
    assert seq.mask == [False] * len(prompt) + [True] * len(ids)
    assert all(math.isnan(x) for x in seq.logprobs[: len(prompt)])
    assert seq.logprobs[len(prompt) :] == [-0.1] * len(ids)
    assert seq.token_ids.count(tok.eos_token_id) == prompt.count(tok.eos_token_id) + 1  # no doubled end of turn
    assert seq.weight == pytest.approx(1 / len(ids))
    assert out.counts["trajectories_used"] == 2 and out.counts["tokens_trained"] == len(ids) + len(
        answer_ids(tok, "Lyon")
    )


def test_sampled_ids_are_kept_even_when_retokenizing_would_differ(tok, template):
    # "Paris" sampled as single characters: re-tokenizing the text would merge them.
    ids = [tok.convert_tokens_to_ids(c) for c in "Paris"] + [tok.eos_token_id]
    assert tok.encode("Paris", add_special_tokens=False) != ids[:-1]
    t = art.Trajectory(messages_and_choices=[{"role": "user", "content": "Q"}, choice(tok, ids)], reward=1.0)
    u = trajectory(tok, "Q", "x", 0.0)
    seq = prepare([art.TrajectoryGroup([t, u])], template).sequences[0]
    assert seq.token_ids[-len(ids) :] == ids
    # The same exact ids recovered from token bytes when the client did not get `token_id:N` entries.
    t_bytes = art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "Q"}, choice(tok, ids, token_ids=False)], reward=1.0
    )
    seq_bytes = prepare([art.TrajectoryGroup([t_bytes, u])], template).sequences[0]
    assert seq_bytes.token_ids == seq.token_ids


def test_multi_turn_with_tool_calls_masks_only_sampled_turns(tok, template):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "add two numbers",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    call = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]
    first = answer_ids(tok, "Let me add them.")
    second = answer_ids(tok, "The sum is 5.")
    messages = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What is 2 + 3?"},
        choice(tok, first, tool_calls=call),
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        choice(tok, second, logprobs=[-0.2] * len(second)),
    ]
    t = art.Trajectory(messages_and_choices=messages, tools=tools, reward=1.0)
    u = trajectory(tok, "What is 2 + 3?", "6", 0.0)
    seq = prepare([art.TrajectoryGroup([t, u])], template).sequences[0]
    masked = [i for i, m in zip(seq.token_ids, seq.mask, strict=True) if m]
    assert masked == first + second
    assert seq.token_ids[-len(second) :] == second
    text = tok.decode(seq.token_ids)
    assert "What is 2 + 3?" in text and "5" in text and "add" in text  # user, tool result and tool schema rendered
    # The tool result sits between the two sampled turns and is not trained on.
    start2 = len(seq.token_ids) - len(second)
    assert not any(seq.mask[start2 - 5 : start2])


TOOLS_TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools_reasoning.jinja"


def with_engine_ids(c, prompt: list[int]):
    """A Choice as our gateway returns it: the engine's prompt ids and sampled ids on it."""
    ids = [int(e.token.split(":")[1]) for e in c.logprobs.content]
    return c.model_copy(update={}, deep=True).__class__(
        **{**c.model_dump(), "prompt_token_ids": prompt, "token_ids": ids}
    )


def test_a_template_that_renders_tool_calls_does_not_get_them_twice(model_path):
    # The sampled ids already hold the call; the template would render it again from the parsed JSON.
    tools_template = ChatTemplate.load(model_path, str(TOOLS_TEMPLATE))
    tok = tools_template.tokenizer
    call = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]
    sampled = tok.encode('<tool_call>\n{"name":"add","arguments":{"a":2,"b":3}}\n</tool_call>') + [tok.eos_token_id]
    t = art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "2 + 3?"}, choice(tok, sampled, tool_calls=call)],
        tools=[{"type": "function", "function": {"name": "add"}}],
        reward=1.0,
    )
    u = trajectory(tok, "2 + 3?", "5", 0.0)
    out = prepare([art.TrajectoryGroup([t, u])], tools_template)
    seq = out.sequences[0]
    assert tok.decode(seq.token_ids).count('"add"') == 2  # in the tool schema and in the one sampled call
    assert seq.token_ids[-len(sampled) :] == sampled
    assert out.counts["contexts_from_template"] == 2


def test_engine_ids_make_one_sequence_per_episode_and_split_where_history_changed(tok, template):
    q = [{"role": "user", "content": "Q"}]
    first = choice(tok, answer_ids(tok, "A"))
    p1 = prompt_ids(tok, q)
    follow = [{"role": "user", "content": "and?"}]
    # The engine's second prompt extends the first turn token for token (what the gateway sends) ...
    p2 = p1 + answer_ids(tok, "A") + prompt_ids(tok, follow)[1:]
    second = choice(tok, answer_ids(tok, "B"))
    exact = art.Trajectory(
        messages_and_choices=[*q, with_engine_ids(first, p1), *follow, with_engine_ids(second, p2)], reward=1.0
    )
    # ... or not (an agent that edited its history): then the second turn starts a sequence of its own.
    edited = art.Trajectory(
        messages_and_choices=[*q, with_engine_ids(first, p1), *follow, with_engine_ids(second, p1 + [7, 8])],
        reward=0.0,
    )
    out = prepare([art.TrajectoryGroup([exact, edited])], template)
    one, *split = out.sequences
    assert one.token_ids == p2 + answer_ids(tok, "B")
    assert [i for i, m in zip(one.token_ids, one.mask, strict=True) if m] == answer_ids(tok, "A") + answer_ids(tok, "B")
    assert [s.token_ids for s in split] == [p1 + answer_ids(tok, "A"), p1 + [7, 8] + answer_ids(tok, "B")]
    assert out.counts["histories_split"] == 1 and out.counts["context_mismatch_tokens"] == 0
    assert out.counts["contexts_from_template"] == 0 and out.counts["choices_without_engine_ids"] == 0
    # ART's weight: one over all of a trajectory's trained tokens, whichever sequence they are in.
    n = 2 * len(answer_ids(tok, "A"))
    assert all(s.weight == pytest.approx(1 / n) for s in split)


def test_what_is_not_exact_is_counted(tok, template):
    """A trained Choice without the engine's ids puts its whole history in the template's context: each such Choice
    is counted, each turn trained in that context, and each context token that differs from a prompt the engine
    was given (here injected: the engine saw other tokens than the template renders)."""
    q, follow = [{"role": "user", "content": "Q"}], [{"role": "user", "content": "and?"}]
    a, b = answer_ids(tok, "A"), answer_ids(tok, "B")

    def counted(second_prompt: list[int] | None):
        second = choice(tok, b) if second_prompt is None else with_engine_ids(choice(tok, b), second_prompt)
        t = art.Trajectory(messages_and_choices=[*q, choice(tok, a), *follow, second], reward=1.0)
        out = prepare([art.TrajectoryGroup([t, trajectory(tok, "Q", "x", 0.0)])], template)
        keys = ("choices_without_engine_ids", "contexts_from_template", "context_mismatch_tokens")
        return out.sequences[0], [out.counts[k] for k in keys]

    rendered, counts = counted(None)
    assert counts == [3, 3, 0]  # two Choices of the trajectory and one of the other sample; no engine prompt known
    context = rendered.token_ids[: -len(b)]  # what the template renders before the second turn
    assert counted(context)[1] == [2, 3, 0]  # the engine saw that context: nothing differs
    injected = context[:-3] + [7, 8, 9]  # the engine saw three other tokens
    assert counted(injected)[1] == [2, 3, 3]
    assert counted(injected[:-1])[1] == [2, 3, 3]  # and a shorter prompt: the missing token counts too


def test_additional_histories_are_trained_with_the_trajectorys_advantage(tok, template):
    side = History(messages_and_choices=[{"role": "user", "content": "Sum up."}, choice(tok, answer_ids(tok, "Ok"))])
    t = trajectory(tok, "Q", "a", 1.0)
    t.additional_histories = [side]
    out = prepare([art.TrajectoryGroup([t, trajectory(tok, "Q", "b", 0.0)])], template)
    assert out.counts["additional_histories"] == 1 and out.counts["sequences"] == 3
    main, extra, _ = out.sequences
    assert extra.advantage == main.advantage and extra.weight == main.weight
    assert extra.token_ids[-len(answer_ids(tok, "Ok")) :] == answer_ids(tok, "Ok")


def test_rewards_equal_within_a_tolerance_teach_nothing(tok, template):
    assert advantages([0.5, 0.5 + 1e-9, 0.5 - 1e-9], scale_rewards=True) == [0.0, 0.0, 0.0]
    nearly = art.TrajectoryGroup([trajectory(tok, "Q", "a", 0.3), trajectory(tok, "Q", "b", 0.1 + 0.2)])
    assert prepare([nearly, nearly], template, scale_rewards=True).sequences == []


def test_advantages_follow_art():
    assert advantages([1.0, 0.0], scale_rewards=False) == [0.5, -0.5]
    scaled = advantages([1.0, 0.0, 0.0, 1.0], scale_rewards=True)
    assert scaled == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)


def test_advantage_balance_scales_one_side_as_art(tok, template):
    assert balance([1.0, -1.0, 0.0], 0.25) == [1.0, -0.75, 0.0]
    assert balance([1.0, -1.0], -0.5) == [0.5, -1.0]
    mixed = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0), trajectory(tok, "Q", "b", 0.0)])
    sequences = prepare([mixed], template, scale_rewards=False, advantage_balance=0.5).sequences
    assert sorted(s.advantage for s in sequences) == [-0.25, 0.5]


def test_zero_variance_groups_are_skipped_and_counted(tok, template):
    same = art.TrajectoryGroup([trajectory(tok, "Q", "a", 0.5), trajectory(tok, "Q", "b", 0.5)])
    mixed = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0), trajectory(tok, "Q", "b", 0.0)])
    out = prepare([same, mixed], template)
    assert out.counts["groups_skipped_zero_variance"] == 1
    assert out.counts["trajectories_skipped_zero_variance"] == 2
    assert {s.group for s in out.sequences} == {1}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_name_the_group(tok, template, bad):
    ok = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0), trajectory(tok, "Q", "b", 0.0)])
    broken = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0), trajectory(tok, "Q", "b", 0.0)])
    broken.trajectories[1].reward = bad
    with pytest.raises(TrajectoryError, match=r"trajectory 1 of group 1 has reward .*must be finite"):
        prepare([ok, broken], template)


def test_empty_group_list_is_an_error(tok, template):
    with pytest.raises(TrajectoryError, match="no trajectory groups"):
        prepare([], template)


def test_missing_logprobs_is_an_error_unless_allowed(tok, template):
    group = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0, with_logprobs=False), trajectory(tok, "Q", "b", 0.0)])
    with pytest.raises(TrajectoryError, match=r"trajectory 0 of group 0 has 1 Choice\(s\) but none carries logprobs"):
        prepare([group], template)
    out = prepare([group], template, allow_training_without_logprobs=True)
    seq = out.sequences[0]
    trained = [lp for lp, m in zip(seq.logprobs, seq.mask, strict=True) if m]
    assert trained and all(math.isnan(lp) for lp in trained)  # the trainer treats them as on-policy


def test_dict_assistant_messages_are_flagged_like_art_127(tok, template):
    as_dicts = art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], reward=1.0
    )
    group = art.TrajectoryGroup([as_dicts, trajectory(tok, "Q", "b", 0.0)])
    with pytest.raises(TrajectoryError, match=r"trajectory 0 of group 0 .*plain dicts.*ART #127"):
        prepare([group], template)
    assert len(prepare([group], template, allow_training_without_logprobs=True).sequences) == 2


def test_overlong_sequences_are_skipped_or_truncated_and_counted(tok, template):
    long = trajectory(tok, "Q", "word " * 60, 1.0)
    short = trajectory(tok, "Q", "a", 0.0)
    group = art.TrajectoryGroup([long, short])
    skipped = prepare([group], template, max_length=40)
    assert skipped.counts["sequences_skipped_overlong"] == 1
    assert [len(s) for s in skipped.sequences] == [len(prepare([group], template).sequences[1])]
    cut = prepare([group], template, max_length=40, overlong="truncate")
    assert cut.counts["sequences_truncated"] == 1
    assert max(len(s) for s in cut.sequences) == 40


def test_groups_of_one_are_skipped_and_counted_and_only_groups_of_one_is_an_error(tok, template, caplog):
    lone = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0)])
    mixed = art.TrajectoryGroup([trajectory(tok, "Q", "a", 1.0), trajectory(tok, "Q", "b", 0.0)])
    out = prepare([lone, mixed], template)
    assert out.counts["groups_skipped_single_trajectory"] == 1
    assert {s.group for s in out.sequences} == {1}
    assert "put 2+ samples of the same prompt in each group" in caplog.text
    with pytest.raises(TrajectoryError, match=r"a group of one teaches nothing\. Put 2\+ trajectories"):
        prepare([lone, lone], template)
