"""Getting middles from a model: in-process (a model in memory, or loaded from an export folder), or
through a served endpoint with the same template and stop handling editor clients use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from midfill.evaluation.suites import InfillTask
from midfill.fim import FimFormat, get_format

# How a middle ended: the model emitted its own end token (<eom>/<|endoftext|>) first; the client
# cut it at one of its stop strings (e.g. the newline of a single-line hole) before that; or neither
# happened within max_new_tokens. Only "model" says the model knows where the middle ends.
EndReason = Literal["model", "stop_string", "length"]
END_REASONS: tuple[EndReason, ...] = ("model", "stop_string", "length")


@dataclass(frozen=True)
class Completion:
    """A generated middle and how it ended."""

    text: str
    end: EndReason

    @property
    def stopped(self) -> bool:
        """Ended by the model or a stop string (not by max_new_tokens)."""
        return self.end != "length"


class Infiller(Protocol):
    """Anything that fills holes."""

    name: str

    def infill(self, tasks: list[InfillTask], *, max_new_tokens: int, stop: list[str]) -> list[Completion]: ...


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def finish(text: str, *, model_ended: bool, stop: list[str]) -> Completion:
    """The middle `text` (what came before the model's end token, if it emitted one) cut at the
    first stop string; a stop string found in it came before the model's own end."""
    text, cut = _cut(text, stop)
    return Completion(text=text, end="stop_string" if cut else "model" if model_ended else "length")


class ModelInfiller:
    """Greedy infilling with a model in memory: a plain model in left-padded batches (transformers
    generate), a composed model (`composed`) one prompt at a time with its own composed cache, as
    serving decodes it (midfill.evaluation.models). The middle ends at the first of `stop_tokens`
    the tokenizer knows, then at the client's stop strings (`finish`). On `device`, under bf16
    autocast with `bf16`."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        fim_format: FimFormat,
        max_context: int,
        stop_tokens: list[str],
        batch_size: int = 8,
        composed: bool = False,
        device: str = "cpu",
        bf16: bool = False,
        name: str = "in-process",
    ) -> None:
        self.name = name
        self.model, self.tokenizer, self.format = model.eval(), tokenizer, fim_format
        self.tokenizer.padding_side = "left"
        self.max_context, self.batch_size, self.composed = max_context, batch_size, composed
        self.device, self.bf16 = device, bf16
        self.stop_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in stop_tokens if t in tokenizer.get_vocab()})

    def _encode(self, task: InfillTask, budget: int) -> list[int]:
        # Keep the prompt within the context: trim the far ends of prefix and suffix, never the hole.
        prefix, suffix = task.prefix, task.suffix
        while True:
            ids = self.tokenizer(self.format.infill_prompt(prefix, suffix), add_special_tokens=False)["input_ids"]
            if len(ids) <= budget or (not prefix and not suffix):
                return ids[-budget:]
            prefix, suffix = prefix[len(prefix) // 4 :], suffix[: len(suffix) * 3 // 4]

    def infill(self, tasks: list[InfillTask], *, max_new_tokens: int, stop: list[str]) -> list[Completion]:
        budget = self.max_context - max_new_tokens
        if self.composed:
            from midfill.evaluation.models import composed_greedy

            rows = [
                composed_greedy(
                    self.model, self._encode(t, budget), max_new_tokens=max_new_tokens, stop_ids=self.stop_ids
                )
                for t in tasks
            ]
            return [self._completion(row, stop) for row in rows]
        out: list[Completion] = []
        for start in range(0, len(tasks), self.batch_size):
            out.extend(
                self._completion(row, stop)
                for row in self._generate(tasks[start : start + self.batch_size], budget, max_new_tokens)
            )
        return out

    def _generate(self, tasks: list[InfillTask], budget: int, max_new_tokens: int) -> list[list[int]]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        batch = [self._encode(t, budget) for t in tasks]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        autocast = torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), autocast:
            gen = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=pad,
            )
        return gen[:, width:].tolist()

    def _completion(self, row: list[int], stop: list[str]) -> Completion:
        # The middle ends at the first stop token (excluded), then at the first stop string.
        ended = next((k for k, tok in enumerate(row) if tok in self.stop_ids), None)
        text = self.tokenizer.decode(row[:ended] if ended is not None else row, skip_special_tokens=False)
        return finish(text, model_ended=ended is not None, stop=stop)


class LocalInfiller(ModelInfiller):
    """A ModelInfiller over an exported model loaded in this process (plain or composed: its
    composition.json). `tracking_uri` and `cache_dir` say where a composition's `models:/` parents
    come from and are downloaded to."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 8,
        fim_format: str | None = None,
        tracking_uri: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        from midfill.evaluation.models import load_export

        self.loaded = load_export(model_dir, tracking_uri=tracking_uri, cache_dir=cache_dir)
        self.meta = self.loaded.meta
        fmt = get_format(fim_format or self.meta.fim_format)
        super().__init__(
            self.loaded.model,
            self.loaded.tokenizer,
            fim_format=fmt,
            max_context=self.meta.max_context,
            stop_tokens=[*fmt.stop_tokens, *self.meta.stop_tokens],
            batch_size=batch_size,
            composed=self.loaded.composed,
            name=str(model_dir),
        )


def endpoint_base(url: str) -> str:
    """The endpoint's base URL (route prefix included) from what a user may pass: with or without /v1."""
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def served_version(url: str) -> tuple[str, str]:
    """(registered model, version) the endpoint's /health says it serves, loaded and warmed up.
    Raises ValueError naming what is wrong (unreachable, not ready, not a midfill endpoint)."""
    import httpx

    health_url = endpoint_base(url) + "/health"
    try:
        response = httpx.get(health_url, timeout=30)
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"{health_url} did not answer with JSON: {exc}") from None
    if response.status_code != 200 or body.get("ready") is not True:
        raise ValueError(f"{health_url} says the endpoint is not ready ({response.status_code}: {body})")
    name, version = body.get("registered_model"), body.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ValueError(f"{health_url} does not name the served version (registered_model, version)")
    return name, version


class EndpointInfiller:
    """Infilling through a served model's OpenAI completions endpoint (prompt + suffix), as Tabby
    and scripts call it. The stop strings are applied here, not sent: the server answers
    finish_reason "stop" for its stop strings and the model's end token alike, and the metrics must
    tell them apart. With `expect_fingerprint` (`<model>/<version>`), every answer must come from that
    version (a rollout during the evaluation is an error, not a mix)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        model: str | None = None,
        concurrency: int = 8,
        expect_fingerprint: str | None = None,
    ) -> None:
        from openai import OpenAI

        self.expect_fingerprint = expect_fingerprint
        self.name = url
        self.client = OpenAI(
            base_url=url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1"),
            api_key=api_key or "none",
            max_retries=2,
        )
        self.model = model or self.client.models.list().data[0].id
        self.concurrency = concurrency

    def _one(self, task: InfillTask, max_new_tokens: int, stop: list[str]) -> Completion:
        resp = self.client.completions.create(
            model=self.model,
            prompt=task.prefix,
            suffix=task.suffix,
            max_tokens=max_new_tokens,
            temperature=0,
        )
        if self.expect_fingerprint is not None and resp.system_fingerprint != self.expect_fingerprint:
            raise RuntimeError(
                f"the endpoint answered with {resp.system_fingerprint}, not {self.expect_fingerprint}: "
                "it changed versions during the evaluation; run it again once the release has settled"
            )
        choice = resp.choices[0]
        return finish(choice.text, model_ended=choice.finish_reason == "stop", stop=stop)

    def infill(self, tasks: list[InfillTask], *, max_new_tokens: int, stop: list[str]) -> list[Completion]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda t: self._one(t, max_new_tokens, stop), tasks))
