"""The generation engine: loads an export and runs a continuous batch of requests on one KV cache.

Why this design (docs/cpu-notes.md): on a CPU, prompt processing dominates and transformers' own continuous
batching ran at 0.4-1.0x sequential. So waiting requests are prefilled in small groups between decode
steps (left-padded to the group's longest prompt, up to `max_prefill_tokens`, logits only for the
last position; a prompt that starts like a recent one reuses its keys/values -- serving.prefill) and
their keys/values are copied into the decode batch's preallocated buffers (serving.kv_slots); every
decode step advances all running requests with one forward pass. Requests join and leave between
steps, so a late arrival never waits for a whole batch to finish.

One background thread owns the model and the cache. Callers submit a request (serving.requests) and
get a handle; the thread reports each step through a callback -- `stream()` wraps it for streaming
clients, `complete()` for the rest -- with its text decoded incrementally (serving.detokenize). Keep it
the only thread of the process that runs torch operations: each such thread gets its own OpenMP
pool, and two pools on few cores make every operation wait for a kernel wake-up (docs/serving.md).
On a CPU the model runs with serving.attention's `midfill_cpu` attention, on a GPU with sdpa.

Two decode paths share admission, stops, streaming and cancellation: "dynamic" (serving.kv_slots,
the width follows the rows; the CPU default) and "static" (serving.static_decode: fixed shapes over
buffers at the full context, replayed from CUDA graphs, sampling on the device; the GPU default).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from midfill.export import ExportMetadata, read_metadata
from midfill.fim import FimFormat, get_format
from serving import attention
from serving.detokenize import IncrementalDetokenizer
from serving.kv_slots import DecodeBatchCache
from serving.packed_prefill import PackedPrefiller
from serving.prefill import Prefiller
from serving.prefix_cache import PrefixCache
from serving.requests import Completion, PromptTooLong, SamplingParams, StepOutput, gathering
from serving.sampling import sample_rows
from serving.sequence import RequestHandle, _Seq
from serving.static_decode import Launched, StaticBatch, request_seed, supports
from serving.stops import StopChecker

log = logging.getLogger(__name__)


class Engine:
    """A loaded export plus the batching loop. Thread-safe: submit() from anywhere."""

    def __init__(
        self,
        model,
        tokenizer,
        metadata: ExportMetadata,
        *,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 2048,
        prefix_cache_tokens: int = 8192,
        max_context: int | None = None,
        fim_format: str | None = None,
        decode_path: str = "auto",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.fim: FimFormat = get_format(fim_format or metadata.fim_format)
        self.max_batch_size = max_batch_size
        # Prompts prefilled together in one forward (padded tokens): batching prefills is ~20% faster
        # per prompt on CPU, but the running requests wait for the whole group.
        self.max_prefill_tokens = max_prefill_tokens
        # Recent prompts' keys/values, reused by prompts that start the same way (0 disables).
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self._prefiller = Prefiller(model, pad_id=tokenizer.pad_token_id or 0, prefix_cache=self.prefix_cache)
        if max_context is not None and max_context > metadata.max_context:
            raise ValueError(f"max_context_tokens {max_context} exceeds the model's max_context {metadata.max_context}")
        self.max_context = max_context or metadata.max_context
        stop_names = metadata.stop_tokens or list(self.fim.stop_tokens)
        vocab = tokenizer.get_vocab()
        missing = [t for t in stop_names if t not in vocab]
        if missing:
            raise ValueError(f"stop tokens {missing} from midfill.json are not in the tokenizer")
        self.stop_token_ids = frozenset(vocab[t] for t in stop_names)
        self._inbox: queue.Queue[_Seq | None] = queue.Queue()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._kv: DecodeBatchCache | None = None  # keys/values of the running rows, created on first use
        self.device = next(model.parameters()).device  # inputs go where the weights are
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) real tokens in the cache per row
        self._next = torch.zeros(
            0, dtype=torch.long, device=self.device
        )  # (B,) last sampled token, input of the next step
        self._closed = False
        self.steps = 0
        self._static = self._static_batch(decode_path)
        self._packed = PackedPrefiller(self._static, self.prefix_cache) if self._static is not None else None
        self._pending: tuple[Launched, list[_Seq]] | None = None  # the static step in flight, and its rows
        self._thread = threading.Thread(target=self._loop, name="midfill-engine", daemon=True)
        self._thread.start()

    # -- the decode path ----------------------------------------------------------------------------
    def _static_batch(self, decode_path: str) -> StaticBatch | None:
        """The static path's batch (capturing its CUDA graphs now, at load), or None for the dynamic path.
        auto = static on a GPU when the model allows it."""
        if decode_path not in ("auto", "static", "dynamic"):
            raise ValueError(f"decode_path: {decode_path!r} is not one of auto, static, dynamic")
        if decode_path == "dynamic" or (decode_path == "auto" and self.device.type != "cuda"):
            return None
        unsupported = supports(self.model)
        if unsupported and decode_path == "static":
            raise ValueError(f"decode_path: static cannot serve {unsupported}; use auto or dynamic")
        if unsupported:
            log.warning("decode path: dynamic, the static step cannot serve %s", unsupported)
            return None
        return StaticBatch(
            self.model, capacity=self.max_batch_size, context=self.max_context, graphs=self.device.type == "cuda"
        )

    @property
    def decode_path(self) -> str:
        """What /health reports: cuda-graphs (static step replayed from graphs), eager (a GPU without
        them), or cpu."""
        if self.device.type == "cpu":
            return "cpu"
        return "cuda-graphs" if self._static is not None and self._static.graphs_active else "eager"

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_export(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        tracking_uri: str | None = None,
        cache_dir: Path | None = None,
        **kwargs,
    ) -> Engine:
        """Load an export folder (midfill.export contract) onto `device` (serving.settings.resolve_device).
        A composed export (composition.json) loads its parents by reference -- models:/ ones from
        `tracking_uri` into `cache_dir` (default: the serving settings') -- and is served by
        `serving.composed.ComposedEngine` (serving.composed.load_engine), on the CPU for now."""
        meta = read_metadata(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        from serving import composed

        if composed.is_composed(path):
            where = {"tracking_uri": tracking_uri, "cache_dir": cache_dir}
            return composed.load_engine(path, tokenizer, meta, dtype=dtype, device=device, **where, **kwargs)
        # On a CPU, serving.attention beats torch's fused kernel for decode steps and low-precision prompts.
        attn = attention.register() if torch.device(device).type == "cpu" else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), attn_implementation=attn)
        return cls(model.to(device), tokenizer, meta, **kwargs)

    # -- the pure API ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def infill_prompt(self, prefix: str, suffix: str) -> str:
        return self.fim.infill_prompt(prefix, suffix)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise PromptTooLong unless prompt + completion fit the context."""
        if prompt_tokens + max_tokens > self.max_context:
            raise PromptTooLong(prompt_tokens=prompt_tokens, max_tokens=max_tokens, max_context=self.max_context)

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_output: Callable[[StepOutput], None]
    ) -> RequestHandle:
        """Queue a request; `on_output` is called from the engine thread for every step and the finish."""
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        self.check_length(len(prompt_ids), params.max_tokens)
        if self._closed:
            raise RuntimeError("engine is closed")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = _Seq(
            list(prompt_ids),
            params,
            on_output,
            StopChecker(params.stop),
            IncrementalDetokenizer(self.tokenizer),
            gen,
            request_seed(params),
        )
        self._inbox.put(seq)
        return RequestHandle(seq)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Blocking: run one request to its end."""
        finished: queue.Queue[Completion] = queue.Queue()
        self.submit(prompt_ids, params, gathering(finished.put))
        result = finished.get()
        if result.finish_reason == "error":
            raise RuntimeError(result.error)
        return result

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Async, for a caller that wants only the end (a non-streaming request): its event loop is
        woken once, at the finish, where `stream` wakes it for every token -- each wake-up is a
        thread switch that competes with the engine thread for the GIL and the cores. A finish
        with reason "error" is returned, not raised; cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[Completion] = loop.create_future()

        def resolve(result: Completion) -> None:
            if not finished.done():  # the awaiting task may have been cancelled meanwhile
                finished.set_result(result)

        def on_end(result: Completion) -> None:
            try:
                loop.call_soon_threadsafe(resolve, result)
            except RuntimeError:  # the event loop is gone: nobody is waiting
                pass

        handle = self.submit(prompt_ids, params, gathering(on_end))
        try:
            return await finished
        finally:
            handle.cancel()  # a no-op once finished; frees the row when the caller gave up

    def infill(self, prefix: str, suffix: str, params: SamplingParams) -> Completion:
        """The middle between prefix and suffix, in the model's own FIM format."""
        return self.generate(self.encode(self.infill_prompt(prefix, suffix)), params)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Async token stream; closing the iterator (client gone) cancels the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()

        def deliver(out: StepOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the event loop is gone; the request will be dropped as cancelled
                handle.cancel()

        handle = self.submit(prompt_ids, params, deliver)
        try:
            while True:
                out = await outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            handle.cancel()

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": len(self._waiting) + self._inbox.qsize()}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # -- the loop (engine thread only) ----------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            self._serve_until_closed()

    def _serve_until_closed(self) -> None:
        while not self._closed:
            block = not self._running and not self._waiting
            try:
                while True:
                    seq = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                    block = False
                    if seq is None:
                        break
                    self._waiting.append(seq)
            except queue.Empty:
                pass
            try:
                self._step()
            except Exception as exc:  # a failed step must not kill the engine: fail its requests, go on
                log.exception("engine step failed")
                for seq in self._running:
                    self._finish(seq, "error", error=f"generation failed: {exc}")
                self._reset_batch()
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, "cancelled")

    def _step(self) -> None:
        # Drop what clients no longer want before spending compute on it.
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        self._retire([s for s in self._running if s.cancelled], reason="cancelled")
        # Admit waiting requests between decode steps: their prefill is the expensive part, and
        # interleaving it with decode steps keeps the running requests streaming.
        group = self._admissions()
        if group:
            self._admit(group)
        if self._running:
            self._decode()

    def _admissions(self) -> list[_Seq]:
        """The waiting requests to prefill together this step: as many as fit the free rows and
        `max_prefill_tokens` (the forward's tokens: padded to the longest prompt, or packed on the
        static path), and always at least one."""
        group: list[_Seq] = []
        longest = packed = 0
        # The static path's buffers were sized at load: a larger max_batch_size set later waits for a reload.
        limit = min(self.max_batch_size, self._static.capacity) if self._static else self.max_batch_size
        while self._waiting and len(self._running) + len(group) < limit:
            n = len(self._waiting[0].prompt_ids)
            longest_with = max(longest, n)
            tokens = packed + n if self._packed is not None else longest_with * (len(group) + 1)
            if group and tokens > self.max_prefill_tokens:
                break
            group.append(self._waiting.popleft())
            longest, packed = longest_with, packed + n
        return group

    def _admit(self, group: list[_Seq]) -> None:
        """Prefill the group and put its keys/values into the decode batch: packed, straight into the
        static path's buffers (serving.packed_prefill), or left-padded, then copied (serving.prefill)."""
        if self._packed is not None:
            seeds = [s.seed for s in group]
            cached, tokens = self._packed.run([s.prompt_ids for s in group], [s.params for s in group], seeds)
            self._joined(group, cached, tokens)
            return
        for indices, done in self._prefiller.run([s.prompt_ids for s in group]):
            seqs = [group[i] for i in indices]
            tokens = self._sample(done.logits, seqs)
            if self._kv is None:
                self._kv = DecodeBatchCache(self.max_context)
            self._kv.add(done.cache, done.mask)
            self._positions = torch.cat([self._positions, done.mask.sum(dim=1)])
            self._next = torch.cat([self._next, torch.tensor(tokens, device=self.device)])
            self._joined(seqs, done.cached_tokens, tokens)

    def _joined(self, seqs: list[_Seq], cached_tokens: list[int], tokens: list[int]) -> None:
        """Requests whose rows were just added: their reused prompt tokens and first generated token."""
        for seq, cached in zip(seqs, cached_tokens, strict=True):
            seq.cached_tokens = cached
        self._running.extend(seqs)
        finished = [seq for seq, token in zip(seqs, tokens, strict=True) if self._accept(seq, token)]
        self._retire(finished, reason=None)  # the first token already ended them (a stop, or max_tokens=1)

    def _decode(self) -> None:
        if self._static is not None:
            # Launch this step before reading the previous one's tokens: the host's work on them
            # overlaps the device's on this step. A request that finished with the previous step got
            # one more token computed here; it is dropped (its row is already done).
            previous, self._pending = self._pending, (self._static.launch(), list(self._running))
            self.steps += 1
            if previous is not None:
                launched, seqs = previous
                tokens = self._static.ids(launched)
                self._retire(
                    [s for s, t in zip(seqs, tokens, strict=True) if not s.done and self._accept(s, t)], reason=None
                )
            return
        mask = self._kv.begin_step()
        logits = self.model(
            input_ids=self._next[:, None],
            attention_mask=mask,
            position_ids=self._positions[:, None],
            past_key_values=self._kv.cache,
            use_cache=True,
        ).logits[:, -1]
        self._kv.end_step()
        self.steps += 1
        self._positions = self._positions + 1
        tokens = self._sample(logits, self._running)
        self._next = torch.tensor(tokens, device=self.device)
        finished = []
        for seq, token in zip(self._running, tokens, strict=True):
            if self._accept(seq, token):
                finished.append(seq)
        self._retire(finished, reason=None)

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        return sample_rows(logits, [(seq.params, seq.generator) for seq in seqs])

    def _accept(self, seq: _Seq, token: int) -> bool:
        """Record one generated token; emit text; True if the request is now finished."""
        if token in self.stop_token_ids:
            seq.stop_token = True
            self._finish(seq, "stop", pending=seq.stops.flush())
            return True
        emit, hit = seq.stops.feed(seq.detokenizer.add(token))
        if hit:
            self._finish(seq, "stop", pending=emit, token_ids=(token,))
            return True
        if len(seq.out_ids) >= seq.params.max_tokens:
            self._finish(seq, "length", pending=emit + seq.stops.flush(), token_ids=(token,))
            return True
        # Sent even when the text is held back (partial UTF-8 or stop prefix): callers count tokens.
        seq.on_output(StepOutput(text=emit, token_ids=(token,), completion_tokens=len(seq.out_ids)))
        return False

    def _finish(
        self, seq: _Seq, reason: str, *, pending: str = "", token_ids: tuple[int, ...] = (), error: str | None = None
    ) -> None:
        if seq.done:
            return
        seq.done = True
        try:
            seq.on_output(
                StepOutput(
                    text=pending,
                    token_ids=token_ids,
                    finished=True,
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt_ids),
                    # The stop token was generated (and costs the same), so usage counts it.
                    completion_tokens=len(seq.out_ids) + int(seq.stop_token),
                    cached_tokens=seq.cached_tokens,
                    error=error,
                )
            )
        except Exception:  # a broken callback is the caller's problem, never the batch's
            log.exception("output callback failed")

    def _retire(self, seqs: list[_Seq], *, reason: str | None) -> None:
        """Remove finished or cancelled rows from the batch."""
        if not seqs:
            return
        for seq in seqs:
            if reason:
                self._finish(seq, reason)
        gone = set(map(id, seqs))
        leaving = [i for i, s in enumerate(self._running) if id(s) in gone]
        order = self._static.remove(leaving) if self._static is not None else self._kv.remove(leaving)
        if not order:
            self._reset_batch()
            return
        self._running = [self._running[i] for i in order]
        if self._static is not None:
            return
        idx = torch.tensor(order, device=self.device)
        self._positions, self._next = self._positions[idx], self._next[idx]

    def _reset_batch(self) -> None:
        self._running = []
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self._next = torch.zeros(0, dtype=torch.long, device=self.device)
        if self._kv is not None:
            self._kv.clear()
        if self._static is not None:
            self._static.clear()
        self._pending = None  # its rows are all finished once the batch is empty
