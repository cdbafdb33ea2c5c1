"""A backend as the tests configure it, and rollouts through ART's OpenAI client: the one-word task, and agent
episodes with tool calls."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import art
from art.preprocessing.policy_spans import (
    validate_complete_policy_token_spans,
    validate_complete_prompt_policy_token_spans,
)

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout
from art_sglang.trainer.data import engine_ids, prepare

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# One tool, for the agent tests and the GPU run
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]


# Agent episodes (test_agents.py, benchmarks/agents_at_scale.py): ChatML that renders tools as Qwen2.5 does and
# drops earlier turns' reasoning as Qwen3 does; the calls pinned by a `regex` (docs/known-issues.md).
AGENT_TEMPLATE = str(Path(__file__).parent / "templates" / "chatml_tools_reasoning.jinja")
CALL = (
    r"<think>[a-z]{1,6}( [a-z]{1,6})?</think>\n"
    r'<tool_call>\n\{"name":"add","arguments":\{"a":[0-9],"b":[0-9]\}\}\n</tool_call>'
)
ANSWER = r"<think>[a-z]{1,6}( [a-z]{1,6})?</think>\n[0-9]{1,2}( 🙂| ✅)?"
AGENT_SYSTEM = "You are a calculator 🧮.   Call   the tool,\n\n then answer."


async def agent_turn(client, model, messages, *, forced: bool, n: int = 1, **sampling):
    extra = {"regex": CALL if forced else ANSWER}
    tool_choice = "required" if forced else "auto"
    return await client.chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=80,
        n=n,
        extra_body=extra,
        **sampling,
    )


def follow(messages, items, choice) -> None:
    """What an agent appends after a reply: the Choice (trainable) and, for each tool call, the tool's result."""
    items.append(choice)
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in choice.message.tool_calls or []:
        args = json.loads(call.function.arguments)
        result = {"role": "tool", "tool_call_id": call.id, "content": f"{args['a'] + args['b']}  ✅\n\n"}
        messages.append(result)
        items.append(result)


async def agent_episodes(model, question, *, n_first: int = 1, **sampling) -> list[art.Trajectory]:
    """3 assistant turns: two forced tool calls (with their results), then an answer. `n_first` samples of the
    first turn each continue as their own episode."""
    client = model.openai_client()
    start = [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": f"{question}  🙂\n\n   Go."}]
    first = await agent_turn(client, model, start, forced=True, n=n_first, **sampling)
    assert len(first.choices) == n_first

    async def rest(choice) -> art.Trajectory:
        messages, items = list(start), list(start)
        follow(messages, items, choice)
        for forced in (True, False):
            follow(messages, items, (await agent_turn(client, model, messages, forced=forced, **sampling)).choices[0])
        return art.Trajectory(messages_and_choices=items, tools=TOOLS)

    return list(await asyncio.gather(*(rest(c) for c in first.choices)))


def trained_turns_are_exact(groups, template) -> tuple[int, int]:
    """Every trained Choice sits in a training sequence right after exactly the prompt the engine was given, with
    exactly its sampled ids; returns (turns checked, sequences)."""
    prepared = prepare(groups, template)
    checked = 0
    for g in groups:
        for trajectory in g.trajectories:
            histories = [trajectory.messages_and_choices]
            histories += [h.messages_and_choices for h in trajectory.additional_histories]
            for items in histories:
                for k, item in enumerate(i for i in items if hasattr(i, "logprobs")):
                    prompt, sampled = engine_ids(item)
                    # ART's own checks of the policy spans PipelineTrainer reads: each covers its part whole
                    validate_complete_policy_token_spans(item, completion_tokens=len(sampled))
                    validate_complete_prompt_policy_token_spans(item, prompt_tokens=len(prompt))
                    spans = item.model_extra["policy_token_spans"]
                    assert [span["policy_version"] for span in spans] == [item.model_extra["weight_version"]]
                    whole = prompt + sampled
                    found = [s for s in prepared.sequences if s.token_ids[: len(whole)] == whole]
                    assert found, f"turn {k}: no training sequence holds its engine prompt and sampled ids"
                    mask = found[0].mask
                    assert all(mask[len(prompt) : len(whole)]) and not mask[len(prompt) - 1]
                    checked += 1
    assert prepared.counts["choices_without_engine_ids"] == prepared.counts["contexts_from_template"] == 0
    return checked, len(prepared.sequences)


def make_backend(path, method: str = "lora") -> SGLangBackend:
    return SGLangBackend(
        path=path,
        sglang_config=SGLangConfig(max_total_tokens=16384, weight_sync_method=method, server_timeout=240),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )


rollout = one_word_rollout  # the tests' name for one episode of the task


async def gather(model, questions, group_size=4, **kwargs):
    return await art.gather_trajectory_groups(
        [art.trajectory_group([rollout(model, q, **kwargs) for _ in range(group_size)]) for q in questions],
        pbar_desc=None,
    )


def mean_reward(groups) -> float:
    rewards = [t.reward for g in groups for t in g.trajectories]
    return sum(rewards) / len(rewards)


def training_sequences(run, groups):
    """The samples of `groups` as training sequences (on a copy with distinct rewards: none is left out, even once
    a group's rewards are all equal)."""
    probe = [g.model_copy(deep=True) for g in groups]
    for group in probe:
        for i, t in enumerate(group.trajectories):
            t.reward = float(i)
    return prepare(probe, run.template).sequences


def engine_logprobs(s) -> list[float]:
    """The engine's logprobs of a sequence's sampled tokens, as it returned them (what the trainer's logprobs of the
    same sequence are compared with)."""
    return [lp for lp, m in zip(s.logprobs[1:], s.mask[1:], strict=True) if m]


async def logprob_gaps(run, sequences) -> list[float]:
    """|engine - trainer| for each sampled token of `sequences`, the trainer scoring with the policy it holds now."""
    trainer = await run.trainer.logprobs(sequences)
    return [
        abs(engine - ours)
        for s, lps in zip(sequences, trainer, strict=True)
        for engine, ours in zip(engine_logprobs(s), lps, strict=True)
    ]


async def served_gap(backend, model, questions: int = 4) -> tuple[float, float]:
    """Mean and max |engine - trainer| logprob over fresh samples: ~0 only when the server serves exactly the
    policy the trainer holds (what proves a sync, rather than a version label)."""
    run = backend.model_run(model)
    trajectories = [await rollout(model, q, max_tokens=12) for q in ONE_WORD_QUESTIONS[:questions]]
    gaps = await logprob_gaps(run, training_sequences(run, [art.TrajectoryGroup(trajectories)]))
    return sum(gaps) / len(gaps), max(gaps)


async def requests_during(model, coro, n: int = 6):
    """Send requests continuously while `coro` runs; return its result and their errors (there must be none)."""
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def keep_sending():
        while not done.is_set():
            try:
                await rollout(model, ONE_WORD_QUESTIONS[5], max_tokens=4)
            except Exception as e:
                errors.append(e)

    senders = [asyncio.create_task(keep_sending()) for _ in range(n // 3)]
    try:
        result = await coro
    finally:
        done.set()
        await asyncio.gather(*senders)
    return result, errors


async def wait_until(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
