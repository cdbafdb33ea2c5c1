"""Building ART trajectories by hand, the way an OpenAI client returns them (for tests)."""

from __future__ import annotations

import art
from openai.types.chat.chat_completion import ChatCompletionMessage, Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob


def choice(
    tokenizer,
    ids: list[int],
    logprobs: list[float] | None = None,
    *,
    token_ids: bool = True,
    with_logprobs: bool = True,
    tool_calls: list[dict] | None = None,
) -> Choice:
    """A Choice whose logprobs name the sampled ids as `token_id:N` (or as token text and bytes)."""
    logprobs = logprobs if logprobs is not None else [-0.5] * len(ids)
    entries = [
        ChatCompletionTokenLogprob(
            token=f"token_id:{i}" if token_ids else tokenizer.decode([i]),
            bytes=list(tokenizer.decode([i]).encode()),
            logprob=lp,
            top_logprobs=[],
        )
        for i, lp in zip(ids, logprobs, strict=True)
    ]
    eos = tokenizer.eos_token_id
    text = tokenizer.decode([i for i in ids if i != eos])
    return Choice(
        index=0,
        finish_reason="tool_calls" if tool_calls else "stop",
        message=ChatCompletionMessage(role="assistant", content=text, tool_calls=tool_calls),
        logprobs=ChoiceLogprobs(content=entries) if with_logprobs else None,
    )


def answer_ids(tokenizer, text: str) -> list[int]:
    """What a model would sample for `text`: its tokens and the end-of-turn token."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def trajectory(tokenizer, question: str, answer: str, reward: float, **kw) -> art.Trajectory:
    return art.Trajectory(
        messages_and_choices=[
            {"role": "user", "content": question},
            choice(tokenizer, answer_ids(tokenizer, answer), **kw),
        ],
        reward=reward,
    )
