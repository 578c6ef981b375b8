"""The cost model behind serve_throughput's numbers: what one request costs the engine's forward
passes (prefill alone and in a group, a decode step at 1, 8 and 32 rows, the static path's step
against the weight-read floor) and the bounds on batching that follow from them (docs/benchmarks.md)."""

from __future__ import annotations

import time

import torch


def cost_model(engine, prompts: list[str]) -> dict:
    """What one request costs the engine's forward passes: prefill per prompt (alone and in a group
    of 4) and one decode step at 1, 8 and 32 rows. These bound what batching can reach (docs)."""
    from transformers import DynamicCache

    from serving.kv_slots import DecodeBatchCache

    model, ids, device = engine.model, [engine.encode(p) for p in prompts], engine.device
    width = max(len(i) for i in ids[:32])
    batch = torch.tensor([[0] * (width - len(i)) + i for i in ids[:32]], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids[:32]], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, repeat: int = 5) -> float:
        """The fastest of `repeat` runs: the cost itself, without this VM's interference."""
        fn()
        best = float("inf")
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best

    def prefill(rows: int):
        cache = DynamicCache(config=model.config)
        model(
            input_ids=batch[:rows],
            attention_mask=mask[:rows],
            position_ids=(mask[:rows].cumsum(1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache

    out = {}
    with torch.inference_mode():
        first = torch.tensor([ids[0]], device=device)
        out["prefill_ms_per_prompt_alone"] = round(
            1000 * timed(lambda: model(input_ids=first, use_cache=False, logits_to_keep=1)), 1
        )
        out["prefill_ms_per_prompt_group_of_4"] = round(1000 * timed(lambda: prefill(4)) / 4, 1)
        for rows in (1, 8, 32):
            kv = DecodeBatchCache(engine.max_context)
            kv.add(prefill(rows), mask[:rows])
            positions = mask[:rows].sum(1)[:, None]
            nxt = torch.ones(rows, 1, dtype=torch.long, device=device)

            def step(kv=kv, nxt=nxt, positions=positions):
                m = kv.begin_step()
                model(input_ids=nxt, attention_mask=m, position_ids=positions, past_key_values=kv.cache, use_cache=True)
                kv.end_step()

            out[f"decode_step_ms_{rows}_rows"] = round(1000 * timed(step, repeat=16), 1)
        if getattr(engine, "_static", None) is not None:
            out.update(static_step_costs(engine, ids, timed))
    return out


def static_step_costs(engine, ids: list[list[int]], timed) -> dict:
    """The static path's step at 1, 8 and 32 rows (a graph replay on a GPU, launch to ids on the host)
    and its ratio to the weight-read floor: the time to read every weight once at the device's copy
    bandwidth, which a decode step cannot beat."""
    from serving.requests import SamplingParams

    static, out = engine._static, {}
    for rows in (r for r in (1, 8, 32) if r <= static.capacity):
        static.clear()
        lengths = [len(i) for i in ids[:rows]]
        # A step's cost does not depend on what the buffers hold: admit the rows without a prefill.
        static.admit(lengths, [1] * rows, [SamplingParams(max_tokens=1)] * rows, [0] * rows)
        out[f"static_step_ms_{rows}_rows"] = round(1000 * timed(lambda: static.ids(static.launch()), repeat=16), 3)
    static.clear()
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    floor = weight_bytes / copy_bandwidth(engine.device)
    out["weight_bytes"] = weight_bytes
    out["weight_read_floor_ms"] = round(1000 * floor, 3)
    out["graphs"] = static.graphs_active
    for key in [k for k in out if k.startswith("static_step_ms_")]:
        out[key.replace("static_step_ms_", "static_step_over_floor_")] = round(out[key] / (1000 * floor), 2)
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second the device moves in a large copy (read + write), the best of a few."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def bounds(costs: dict, new_tokens: int) -> dict:
    """What the cost model allows. Sequential: a prefill plus new_tokens - 1 single-row steps per
    request. Batched at c rows: a grouped prefill plus new_tokens steps shared by c rows. With c
    clients in a closed loop, each request's latency is at least c times the work per request
    (Little's law: c = throughput x latency), however the work is scheduled."""
    sequential = costs["prefill_ms_per_prompt_alone"] + (new_tokens - 1) * costs["decode_step_ms_1_rows"]
    per_request = {
        c: costs["prefill_ms_per_prompt_group_of_4"] + new_tokens * costs[f"decode_step_ms_{c}_rows"] / c
        for c in (8, 32)
    }
    return {
        "sequential_request_ms": round(sequential, 1),
        "throughput_ceiling_vs_sequential_at_32": round(sequential / per_request[32], 2),
        "latency_floor_at_8_over_sequential": round(8 * per_request[8] / sequential, 2),
    }
