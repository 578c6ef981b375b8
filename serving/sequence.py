"""One request as the engine's thread holds it (serving.engine), and the handle its caller keeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serving.detokenize import IncrementalDetokenizer
from serving.requests import SamplingParams, StepOutput
from serving.stops import StopChecker


@dataclass(eq=False)
class _Seq:
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[StepOutput], None]
    stops: StopChecker
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    seed: int  # the static path's sampling seed (the request's, or a random one)
    cancelled: bool = False
    done: bool = False
    stop_token: bool = False
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused (serving.prefix_cache)
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def out_ids(self) -> list[int]:
        return self.detokenizer.ids


class RequestHandle:
    """Lets the caller stop a request; the engine drops it before its next step."""

    def __init__(self, seq: _Seq) -> None:
        self._seq = seq

    def cancel(self) -> None:
        self._seq.cancelled = True

    @property
    def done(self) -> bool:
        return self._seq.done
