"""What a request is to the engine (serving.engine): its sampling parameters, what each step
produces for it, the finished completion, and the error for a prompt that does not fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class PromptTooLong(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context; nothing is truncated."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, max_context: int) -> None:
        self.prompt_tokens, self.max_tokens, self.max_context = prompt_tokens, max_tokens, max_context
        if prompt_tokens >= max_context:
            msg = (
                f"the prompt is {prompt_tokens} tokens but the model's context is {max_context} tokens "
                f"(prompt + completion); shorten the prompt to at most {max_context - 1} tokens"
            )
        else:
            msg = (
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                f"of {max_context} tokens; lower max_tokens to {max_context - prompt_tokens} or shorten the prompt"
            )
        super().__init__(msg)

    @property
    def prompt_alone_too_long(self) -> bool:
        return self.prompt_tokens >= self.max_context


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1 and self.temperature >= 0 and 0 < self.top_p <= 1


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request: new text (may be empty) and, last, the finish."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # on the finish: prompt tokens served from the prefix cache
    error: str | None = None


@dataclass
class Completion:
    """A finished request, as `generate` and `complete` return it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error"


def gathering(on_end: Callable[[Completion], None]) -> Callable[[StepOutput], None]:
    """An `on_output` callback that gathers a request's steps and calls `on_end` once, with the
    whole Completion, at the finish (on the engine thread)."""
    text: list[str] = []
    ids: list[int] = []

    def on_output(out: StepOutput) -> None:
        text.append(out.text)
        ids.extend(out.token_ids)
        if out.finished:
            assert out.finish_reason is not None, "a finished step names its finish reason"
            on_end(
                Completion(
                    "".join(text),
                    ids,
                    out.finish_reason,
                    out.prompt_tokens,
                    out.completion_tokens,
                    out.cached_tokens,
                    out.error,
                )
            )

    return on_output
