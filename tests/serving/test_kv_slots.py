"""The decode batch's preallocated key/value buffers: rows that join (longer or shorter than the
columns in use, alone or as a padded group), leave and get compacted must decode exactly as each
request would on its own cache."""

from __future__ import annotations

import pytest
import torch
from serving_exports import tiny_llama  # tests/serving, on sys.path through conftest
from transformers import DynamicCache

from serving import attention
from serving.kv_slots import DecodeBatchCache

VOCAB = 96


@pytest.fixture(scope="module", params=["sdpa", attention.NAME])
def model(request):
    """Both attentions the engine uses: sdpa (GPU) and serving.attention (CPU)."""
    m = tiny_llama(VOCAB)
    m.set_attn_implementation(attention.register() if request.param == attention.NAME else "sdpa")
    return m


class Alone:
    """One request on its own growing cache: the reference."""

    def __init__(self, model, prompt: list[int]) -> None:
        self.model, self.cache = model, DynamicCache(config=model.config)
        with torch.inference_mode():
            self.last = model(input_ids=torch.tensor([prompt]), past_key_values=self.cache, use_cache=True).logits[
                0, -1
            ]

    def step(self, token: int) -> torch.Tensor:
        with torch.inference_mode():
            self.last = self.model(
                input_ids=torch.tensor([[token]]), past_key_values=self.cache, use_cache=True
            ).logits[0, -1]
        return self.last


class Batch:
    """The engine's use of DecodeBatchCache, without the engine."""

    def __init__(self, model, kv: DecodeBatchCache) -> None:
        self.model, self.kv = model, kv
        self.positions: list[int] = []
        self.names: list[str] = []

    def join(self, prompts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, prompts.values()))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts.values()])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts.values()])
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            self.kv.add(cache, mask)
        self.names += list(prompts)
        self.positions += [len(p) for p in prompts.values()]
        return dict(zip(prompts, logits, strict=True))

    def step(self, tokens: dict[str, int]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            mask = self.kv.begin_step()
            logits = self.model(
                input_ids=torch.tensor([[tokens[n]] for n in self.names]),
                attention_mask=mask,
                position_ids=torch.tensor(self.positions)[:, None],
                past_key_values=self.kv.cache,
                use_cache=True,
            ).logits[:, -1]
            self.kv.end_step()
        self.positions = [p + 1 for p in self.positions]
        return dict(zip(self.names, logits, strict=True))

    def leave(self, *names: str) -> None:
        with torch.inference_mode():
            order = self.kv.remove([self.names.index(n) for n in names])
        self.names = [self.names[i] for i in order]
        self.positions = [self.positions[i] for i in order]


def _prompt(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=gen).tolist()


def test_joins_leaves_and_compaction_decode_like_separate_caches(model):
    gen = torch.Generator().manual_seed(1)
    # Small buckets (4 columns) so the run re-lays the buffers out several times.
    kv = DecodeBatchCache(44, bucket=4)
    batch, alone = Batch(model, kv), {}

    def join(**prompts: list[int]) -> None:
        got = batch.join(prompts)
        for name, prompt in prompts.items():
            alone[name] = Alone(model, prompt)
            torch.testing.assert_close(got[name], alone[name].last, atol=1e-5, rtol=1e-5)

    def steps(n: int) -> None:
        for _ in range(n):
            tokens = {name: int(torch.randint(1, VOCAB, (1,), generator=gen)) for name in batch.names}
            got = batch.step(tokens)
            for name, token in tokens.items():
                torch.testing.assert_close(got[name], alone[name].step(token), atol=1e-5, rtol=1e-5)

    join(a=_prompt(gen, 6))
    steps(3)
    join(b=_prompt(gen, 15))  # longer than the columns in use: the running row shifts right
    steps(2)
    join(c=_prompt(gen, 3), d=_prompt(gen, 9))  # a padded group, shorter than the columns in use
    steps(4)
    batch.leave("a")  # the last row moves into its place
    steps(3)
    batch.leave("b", "c")
    join(e=_prompt(gen, 12))
    steps(20)  # d reaches 36 tokens: past the write column's end, the buffer compacts
    assert kv.relayouts >= 3
    assert kv.width <= 44 + 2 * 4
    batch.leave("d", "e")
    assert kv.rows == 0 and kv.cols == 0


def test_rows_grow_past_the_first_allocation_and_padding_stays_finite(model):
    gen = torch.Generator().manual_seed(2)
    kv = DecodeBatchCache(64)
    batch = Batch(model, kv)
    batch.join({"a": _prompt(gen, 5)})
    for i in range(5):  # capacity doubles from 1 row
        batch.join({f"r{i}": _prompt(gen, 4 + 3 * i)})
    assert kv.rows == 6
    got = batch.step({name: 1 for name in batch.names})
    assert all(torch.isfinite(v).all() for v in got.values())
    for layer in kv.cache.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()


def test_a_prompt_longer_than_the_buffer_is_refused(model):
    kv = DecodeBatchCache(8)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.ones(1, 10, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="10 tokens"):
        kv.add(cache, torch.ones(1, 10, dtype=torch.long))


def test_the_model_sees_contiguous_buffers_whose_width_moves_in_whole_buckets(model):
    """serving.attention's matrix products read the buffers without copying only if they are
    contiguous, and oneDNN reuses its kernels only if the shapes repeat."""
    gen = torch.Generator().manual_seed(3)
    kv = DecodeBatchCache(200, bucket=16)
    batch = Batch(model, kv)
    batch.join({"a": _prompt(gen, 20), "b": _prompt(gen, 7)})
    widths = set()
    for _ in range(40):
        batch.step({name: 1 for name in batch.names})
        widths.add(kv.width)
        for layer in kv.cache.layers:
            assert layer.keys.is_contiguous() and layer.values.is_contiguous()
            assert layer.keys.shape[2] == kv.width
        assert (
            kv.width % 16 == 0 and kv.cols <= kv.width <= kv.cols + 2 * 16
        )  # cols == width: the next step re-lays out
    assert len(widths) <= 4  # 40 steps crossed at most 3 bucket boundaries
    batch.leave("a")  # b's row has 13 leading padding columns: not yet a whole bucket
    assert kv.width % 16 == 0
    before = kv.relayouts
    batch.join({"c": _prompt(gen, 3)})  # shorter than the columns in use: no re-layout
    assert kv.relayouts == before
