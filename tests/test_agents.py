"""Agent-shaped RL through ART's API against a real SGLang server: multi-turn episodes with tool calls and tool
results, emoji and runs of whitespace, temperature 0.7 with top_p 0.9 and temperature 1, n = 4, additional
histories. What must hold: the trainer trains every turn in exactly the context the engine sampled it in, and the
engine's logprobs are the policy's (|engine - trainer| < 1e-3 mean, < 1e-2 max).

The server gets a test chat template (tests/templates/chatml_tools_reasoning.jinja): ChatML that renders tools as
Qwen2.5 does and, as Qwen3 does, drops the reasoning of earlier turns, so re-rendering the history would not give
what the engine saw. SmolLM2's tokenizer has no <tool_call> special token, so the tool-call format here is plain
text (the `qwen25` parser, chosen from the template, reads it). SGLang's forced-call grammar for `tool_choice`
"required" leaves the model free to answer in text on the CPU's grammar backend (llguidance; docs/known-issues.md),
so each forced turn also sends a `regex` (SGLang's constrained decoding) that pins the call; the calls are written
without spaces, so the template re-serializes them differently from what was sampled.
"""

from __future__ import annotations

import asyncio
import json

import art
import httpx
import openai
import pytest
from art_compat import History
from rollouts import (
    AGENT_TEMPLATE,
    BASE,
    CALL,
    TOOLS,
    agent_episodes,
    agent_turn,
    logprob_gaps,
    trained_turns_are_exact,
)

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.trainer.data import engine_ids, prepare


def backend_for(path, **config) -> SGLangBackend:
    values = dict(max_total_tokens=16384, server_timeout=240, chat_template=AGENT_TEMPLATE)
    return SGLangBackend(
        path=path,
        sglang_config=SGLangConfig(**{**values, **config}),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )


def group(trajectories: list[art.Trajectory]) -> art.TrajectoryGroup:
    """Distinct rewards, so that every trajectory has an advantage and trains (what is tested is the data path)."""
    for i, trajectory in enumerate(trajectories):
        trajectory.reward = float(i)
    return art.TrajectoryGroup(trajectories)


def history_breaks(trajectory, template) -> list[str]:
    """Where a turn's prompt does not extend the previous turn's prompt and reply (for failure messages)."""
    breaks, previous = [], None
    for k, choice in enumerate(i for i in trajectory.messages_and_choices if hasattr(i, "logprobs")):
        prompt, sampled = engine_ids(choice)
        if previous is not None and prompt[: len(previous)] != previous:
            at = next((i for i, (a, b) in enumerate(zip(prompt, previous, strict=False)) if a != b), len(previous))
            text = template.tokenizer.decode
            seen, given = text(previous[at - 15 : at + 15]), text(prompt[at - 15 : at + 15])
            breaks.append(f"turn {k} at token {at}: {seen!r} became {given!r}")
        previous = prompt + sampled
    return breaks


@pytest.fixture(scope="module")
async def agent(tmp_path_factory):
    model = art.TrainableModel(name="agent", run_name="agent", project="tests", base_model=BASE)
    backend = backend_for(tmp_path_factory.mktemp("agents"))
    await model.register(backend)
    yield model, backend, backend.model_run(model)
    await backend.close()


@pytest.fixture(scope="module")
async def rollouts(agent):
    model, _, _ = agent
    # the first grammar compiles slowly
    cold = await agent_episodes(model, "What is 2 + 3?", temperature=0.7, top_p=0.9)
    warm = await asyncio.gather(
        *(agent_episodes(model, "What is 2 + 3?", temperature=0.7, top_p=0.9) for _ in range(3)),
        *(agent_episodes(model, "What is 4 + 1?", temperature=1.0) for _ in range(4)),
    )
    nucleus = group(cold + [t for ts in warm[:3] for t in ts])
    full = group([t for ts in warm[3:] for t in ts])
    sampled_n = group(await agent_episodes(model, "What is 3 + 3?", n_first=4, temperature=0.7, top_p=0.9))
    return {"nucleus": nucleus, "full": full, "n4": sampled_n}


async def test_tool_calls_come_back_as_openai_objects_and_results_go_in_the_next_turn(rollouts):
    for g in rollouts.values():
        for trajectory in g.trajectories:
            choices = [i for i in trajectory.messages_and_choices if hasattr(i, "logprobs")]
            assert len(choices) == 3
            for choice in choices[:2]:
                assert choice.finish_reason == "tool_calls"
                (call,) = choice.message.tool_calls
                assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
            assert choices[2].message.tool_calls is None
            tools = [i for i in trajectory.messages_and_choices if isinstance(i, dict) and i["role"] == "tool"]
            assert len(tools) == 2 and all("✅" in t["content"] for t in tools)


async def test_every_trained_turn_is_in_the_engines_context(rollouts, agent):
    _, _, run = agent
    groups = list(rollouts.values())
    checked, sequences = trained_turns_are_exact(groups, run.template)
    trajectories = sum(len(g.trajectories) for g in groups)
    assert checked == 3 * trajectories
    # Each episode's history was token-exact: one sequence each, no split.
    breaks = [b for g in groups for t in g.trajectories for b in history_breaks(t, run.template)]
    assert sequences == trajectories and not breaks, breaks
    # The case is a hard one: re-rendering turn 2's history with the template gives another context.
    t = rollouts["nucleus"].trajectories[0]
    second = [i for i in t.messages_and_choices if hasattr(i, "logprobs")][1]
    history = art.Trajectory(messages_and_choices=t.messages_and_choices[: t.messages_and_choices.index(second)])
    rendered = run.template.render(history.messages(), TOOLS, add_generation_prompt=True)
    assert rendered != engine_ids(second)[0]


@pytest.mark.parametrize("name", ["nucleus", "full", "n4"])
async def test_engine_logprobs_are_the_policys(rollouts, agent, name):
    # Constrained turns (regex) are scored again without the grammar; every sampled token counts here.
    run = agent[2]
    gaps = await logprob_gaps(run, prepare([rollouts[name]], run.template).sequences)
    assert len(gaps) > 100
    assert sum(gaps) / len(gaps) < 1e-3 and max(gaps) < 1e-2, (sum(gaps) / len(gaps), max(gaps))


async def test_a_step_trains_on_episodes_and_additional_histories_and_syncs(rollouts, agent):
    model, backend, run = agent
    client = model.openai_client()
    summary = await client.chat.completions.create(
        model=model.get_inference_name(), messages=[{"role": "user", "content": "Summarize: 2 + 3 = 5."}], max_tokens=8
    )
    with_history = rollouts["full"].trajectories[0]
    with_history.additional_histories = [
        History(messages_and_choices=[{"role": "user", "content": "Summarize: 2 + 3 = 5."}, summary.choices[0]])
    ]
    result = await backend.train(model, list(rollouts.values()), learning_rate=1e-4)
    m = result.metrics
    assert result.step == 1
    assert m["data/choices_without_engine_ids"] == m["data/contexts_from_template"] == 0  # every turn exact
    assert m["data/context_mismatch_tokens"] == 0 and m["data/histories_split"] == 0
    assert m["data/additional_histories"] == 1
    assert m["data/sequences"] == m["data/trajectories_used"] + 1  # the additional history is a sequence too
    assert m["engine_trainer_logprob_gap"] < 1e-3 and m["engine_trainer_logprob_gap_max"] < 1e-2, m
    assert m["engine_trainer_logprob_gap_over_1e-2"] == 0
    after = await agent_turn(client, model, [{"role": "user", "content": "1 + 1?"}], forced=True)
    assert after.model_extra["metadata"]["weight_version"] == "1"


async def test_a_streamed_tool_call_arrives_as_tool_calls_and_its_history_stays_exact(agent):
    model, _, _ = agent
    client = model.openai_client()
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    stream = await client.chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=48,
        stream=True,
        extra_body={"regex": CALL},
    )
    content, calls, ids, prompt, finish = "", {}, [], None, None
    async for chunk in stream:
        prompt = prompt or (chunk.model_extra or {}).get("prompt_token_ids")
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(
                    d.index, {"id": d.id, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["function"]["name"] += d.function.name or ""
                call["function"]["arguments"] += d.function.arguments or ""
            ids += (choice.model_extra or {}).get("token_ids") or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls[0]["function"]["name"] == "add" and calls[0]["id"]
    assert prompt and ids  # the exact ids, as vLLM streams them
    # The next turn's prompt extends this one's prompt and sampled ids: the streamed reply was recorded (its stop
    # token, streamed with no entry, included), so the gateway did not re-render it from text.
    args = json.loads(calls[0]["function"]["arguments"])
    messages += [
        {"role": "assistant", "content": content, "tool_calls": list(calls.values())},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": str(args["a"] + args["b"])},
    ]
    after = await agent_turn(client, model, messages, forced=False)
    prompt_after = after.choices[0].model_extra["prompt_token_ids"]
    assert prompt_after[: len(prompt) + len(ids)] == prompt + ids


async def test_a_streamed_reply_carries_only_the_engines_ids(agent):
    """Streamed chunks get ids recovered from each token's bytes; SGLang gives a token that is part of a multi-byte
    character (an emoji, CJK) the bytes of U+FFFD, which belong to another token: such chunks carry no ids and the
    reply is not remembered. Checked against the engine: the same greedy request, not streamed, returns its ids."""
    model, _, run = agent
    client = model.openai_client()
    messages = [{"role": "user", "content": "Say yes, with a check mark, then 'math' in Chinese."}]
    request = {
        "model": model.get_inference_name(),
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0.0,
        "extra_body": {"regex": "Yes ✅ 数学"},
    }
    plain = (await client.chat.completions.create(**request)).choices[0]
    engine, first_prompt = plain.model_extra["token_ids"], plain.model_extra["prompt_token_ids"]
    assert any("\ufffd" in run.template.tokenizer.decode([i]) for i in engine)  # the case: partial characters
    position, withheld = 0, 0
    async for chunk in await client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            n = len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
            ids = (choice.model_extra or {}).get("token_ids")
            if ids is None:
                withheld += n
            else:
                assert ids == engine[position : position + n], (position, ids, engine)
            position += n
    assert withheld > 0 and position >= len(engine) - 1  # every sampled token streamed (the stop token has no entry)
    # The streamed reply was not remembered over the plain one, whose exact ids the next turn's history still gets.
    history = [*messages, {"role": "assistant", "content": plain.message.content}, {"role": "user", "content": "Ok."}]
    after = await client.chat.completions.create(model=model.get_inference_name(), messages=history, max_tokens=2)
    prompt = after.choices[0].model_extra["prompt_token_ids"]
    assert prompt[: len(first_prompt) + len(engine)] == first_prompt + engine


async def test_structured_output_is_answered_and_the_server_stays_up(agent):
    model, _, run = agent
    pid, restarts = run.server.pid, run.restarts
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=[{"role": "user", "content": "2 + 3? Reply in JSON."}],
        max_tokens=24,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert r.choices[0].message.content.lstrip().startswith("{")
    assert run.server.pid == pid and run.restarts == restarts and run.server.running


async def test_a_request_that_crashes_the_server_fails_alone_and_the_rest_carry_on(tmp_path):
    """A known server-killer: xgrammar (SGLang's default grammar backend) on the CPU dies on any constrained
    request. It crashes the server once with the others, once alone, then fails with a clear error."""
    model = art.TrainableModel(name="crashy", run_name="crashy", project="tests", base_model=BASE)
    async with backend_for(tmp_path, grammar_backend="xgrammar") as backend:
        await model.register(backend)
        run = backend.model_run(model)
        client = model.openai_client()

        async def plain(i: int):
            return await client.chat.completions.create(
                model=model.get_inference_name(),
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=24,
                extra_body={"ignore_eos": True},
            )

        others = [asyncio.create_task(plain(i)) for i in range(4)]
        await asyncio.sleep(0.5)
        with pytest.raises(openai.InternalServerError, match="crashes the policy server, so it is not sent again"):
            await client.chat.completions.create(
                model=model.get_inference_name(),
                messages=[{"role": "user", "content": "JSON please."}],
                max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
            )
        answers = await asyncio.gather(*others)
        assert all(a.choices[0].message.content for a in answers)
        assert run.restarts == 2 and run.server.running
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{run.server.base_url}/health", timeout=30)).status_code == 200
        assert (await plain(1)).choices[0].message.content
