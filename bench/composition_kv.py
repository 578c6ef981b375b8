"""CALM's key-value arithmetic experiment, in miniature (Bansal et al., 2024, §4.1; docs/research.md §5).

Three tiny Llama models over one word-level vocabulary defined here:

- the augmenting model A learns a table of key → value assignments ("K17 4 K3 9 ...", values 0-9);
- the anchor B learns arithmetic over named variables whose values it is given in the context
  ("a = 3 , b = 5 ; b - a = 2"); it never sees a key;
- then, with both frozen, only a bridge is trained on a small set that needs both: arithmetic over
  keys ("K17 + K3 = 13"), on 60% of the keys. Accuracy is measured on held-out keys the bridge never
  saw (the headline, as in the paper) and on new pairs of the training keys.

The paper reports 0.0 (anchor) / 0.7 (augmenting model) / 84.3 (composed). The same is done for the
codet5p mode (A as a bidirectional encoder, cross-attention in the top anchor layers), with the
encoder frozen and trainable.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/composition_kv.py [--scale 0.2]

Writes bench/results/composition_kv.json and prints the Markdown tables of docs/composition.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "platform"))

from midfill.api.trainingrun import CompositionSpec  # noqa: E402
from midfill.composition import (  # noqa: E402
    build_composed_model,
    greedy_generate,
    num_total,
    num_trainable,
    trainable_parameters,
)

NUM_KEYS = 120
TRAIN_KEY_SHARE = 0.6
VALUES = range(10)
RESULTS = range(-9, 19)  # a ± b for a, b in 0..9
VARIABLES = "abcdefghijklmnopqrstuvwxyz"


class Vocab:
    """Word-level: specials, numbers -9..18, operators, variables a-z, keys K000..K119."""

    def __init__(self) -> None:
        words = ["<pad>", "<bos>", "<eos>", "=", "+", "-", ",", ";"]
        words += [str(n) for n in RESULTS] + list(VARIABLES) + [f"K{k:03d}" for k in range(NUM_KEYS)]
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, text: str) -> list[int]:
        return [self.index[w] for w in text.split()]


@dataclass
class Example:
    prompt: list[int]  # ends with "=" (or, for A's table, with the key)
    answer: list[int]  # the answer and <eos>


def table_sequence(v: Vocab, table: dict[int, int], rng: random.Random, pairs: int = 8) -> list[int]:
    """A's training text: <bos> K17 4 K3 9 ... <eos>; every value follows its key directly."""
    keys = rng.sample(sorted(table), pairs)
    return v.ids("<bos> " + " ".join(f"K{k:03d} {table[k]}" for k in keys) + " <eos>")


def anchor_example(v: Vocab, rng: random.Random) -> Example:
    """B's task: <bos> a = 3 , b = 5 ; b - a = 2 <eos> (the order of both lines is random)."""
    names = rng.sample(VARIABLES, 2)
    values = {n: rng.choice(VALUES) for n in names}
    x, y = rng.sample(names, 2)
    op = rng.choice("+-")
    given = " , ".join(f"{n} = {values[n]}" for n in names)
    result = values[x] + values[y] if op == "+" else values[x] - values[y]
    return Example(v.ids(f"<bos> {given} ; {x} {op} {y} ="), v.ids(f"{result} <eos>"))


def key_example(v: Vocab, table: dict[int, int], k1: int, k2: int, op: str) -> Example:
    """The composed task: <bos> K17 + K3 = 13 <eos> — the values live only in A."""
    result = table[k1] + table[k2] if op == "+" else table[k1] - table[k2]
    return Example(v.ids(f"<bos> K{k1:03d} {op} K{k2:03d} ="), v.ids(f"{result} <eos>"))


def llama(vocab: Vocab, *, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=0,
            attn_implementation="sdpa",
        )
    )


def batch_of(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-length examples → (input ids (B, T), targets (B, T) with -100 outside the answer)."""
    seqs = [e.prompt + e.answer for e in examples]
    assert len({len(s) for s in seqs}) == 1, "benchmark batches are built from same-length examples"
    ids = torch.tensor(seqs)
    targets = torch.full_like(ids, -100)
    p = len(examples[0].prompt)
    targets[:, p - 1 : -1] = ids[:, p:]  # predict the answer and <eos> only
    return ids[:, :-1], targets[:, :-1]


def train(step_loss, params, *, steps: int, lr: float, log: str) -> float:
    """AdamW with linear warm-up and cosine decay; returns seconds taken."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    start = time.perf_counter()
    for step in range(steps):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  {log} step {step:5d} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return time.perf_counter() - start


def lm_loss(lm, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm(ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def accuracy(generate, examples: list[Example], *, batch: int = 256) -> float:
    """Exact match of the greedy answer and <eos>."""
    right = 0
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        prompts = torch.tensor([e.prompt for e in chunk])
        out = generate(prompts, len(chunk[0].answer))  # (B, T + n)
        answers = torch.tensor([e.answer for e in chunk])
        right += int((out[:, prompts.shape[1] :] == answers).all(-1).sum())
    return 100.0 * right / len(examples)


def plain_greedy(lm):
    """Greedy continuation by one parent alone (answers are 2 tokens: no cache needed)."""

    def generate(prompts: torch.Tensor, n: int) -> torch.Tensor:
        tokens = prompts
        for _ in range(n):
            tokens = torch.cat([tokens, lm(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokens

    return generate


def composed_context(mode: str, ids: torch.Tensor) -> dict:
    """codet5p's encoder reads "<bos> K1 op K2" — the prompt without "=", and never the answer."""
    return {"encoder_input_ids": ids[:, :4]} if mode == "codet5p" else {}


def composed_greedy(model):
    def generate(prompts: torch.Tensor, n: int) -> torch.Tensor:
        context = composed_context(model.mode, prompts)
        return greedy_generate(model, prompts, max_new_tokens=n, **context).tokens

    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.1 = smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/composition_kv.json")
    args = parser.parse_args()
    # One thread: the benchmark's matrices are tiny, and two threads on a shared 2-core machine
    # were 10-20x slower per step than one (they spin while waiting for each other).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    v = Vocab()
    steps = {
        name: max(10, int(n * args.scale))
        for name, n in {"augment": 1000, "anchor": 1500, "calm": 1000, "codet5p": 1000}.items()
    }
    batch_size = 64

    table = {k: rng.choice(VALUES) for k in range(NUM_KEYS)}
    keys = list(range(NUM_KEYS))
    rng.shuffle(keys)
    cut = int(TRAIN_KEY_SHARE * NUM_KEYS)
    train_keys, heldout_keys = sorted(keys[:cut]), sorted(keys[cut:])
    train_pairs = [(a, b, op) for a in train_keys for b in train_keys if a != b for op in "+-"]
    rng.shuffle(train_pairs)
    # A small composition set (the paper's point: the bridge needs little data); the rest of the
    # training keys' pairs are a second, easier test: new pairs of keys the bridge has seen.
    compose_train = [key_example(v, table, *p) for p in train_pairs[:2000]]
    eval_seen = [key_example(v, table, *p) for p in train_pairs[2000:2600]]
    heldout_pairs = [(a, b, op) for a in heldout_keys for b in heldout_keys if a != b for op in "+-"]
    eval_heldout = [key_example(v, table, *p) for p in rng.sample(heldout_pairs, 1000)]

    augment = llama(v, hidden=64, layers=4, seed=args.seed + 1)
    anchor = llama(v, hidden=96, layers=4, seed=args.seed + 2)
    seconds = {}

    print("augmenting model: key → value table", file=sys.stderr)

    def augment_step(_: int) -> torch.Tensor:
        ids = torch.tensor([table_sequence(v, table, rng) for _ in range(batch_size)])  # (B, 18)
        targets = torch.full_like(ids, -100)
        targets[:, 2:-1:2] = ids[:, 2:-1:2]  # the values; the keys are drawn at random, nothing to learn
        return lm_loss(augment, ids[:, :-1], targets[:, 1:])

    augment.train()
    seconds["augment"] = train(augment_step, list(augment.parameters()), steps=steps["augment"], lr=3e-3, log="augment")

    print("anchor: arithmetic over given variables", file=sys.stderr)

    def anchor_step(_: int) -> torch.Tensor:
        return lm_loss(anchor, *batch_of([anchor_example(v, rng) for _ in range(batch_size)]))

    anchor.train()
    seconds["anchor"] = train(anchor_step, list(anchor.parameters()), steps=steps["anchor"], lr=3e-3, log="anchor")
    anchor.eval()
    augment.eval()

    # What each parent knows on its own.
    recall = [Example(v.ids(f"<bos> K{k:03d}"), v.ids(str(table[k]))) for k in heldout_keys]
    own_task = [anchor_example(v, rng) for _ in range(1000)]
    parents = {
        "augment_table_recall": accuracy(plain_greedy(augment), recall),
        "anchor_own_task": accuracy(plain_greedy(anchor), own_task),
    }
    rows = {
        "anchor alone": {
            "heldout_keys": accuracy(plain_greedy(anchor), eval_heldout),
            "seen_keys_new_pairs": accuracy(plain_greedy(anchor), eval_seen),
        },
        "augmenting model alone": {
            "heldout_keys": accuracy(plain_greedy(augment), eval_heldout),
            "seen_keys_new_pairs": accuracy(plain_greedy(augment), eval_seen),
        },
    }
    print(json.dumps({"parents": parents, **rows}), file=sys.stderr)

    variants = {
        "calm": dict(mode="calm", layer_spacing=2),
        "codet5p, encoder frozen": dict(mode="codet5p", cross_attention_layers=1, encoder_trainable=False),
        "codet5p, encoder trainable": dict(mode="codet5p", cross_attention_layers=1, encoder_trainable=True),
    }
    params = {}
    for name, knobs in variants.items():
        print(f"composition: {name}", file=sys.stderr)
        # Fresh copies of the parents: a trainable encoder must not leak into the next variant.
        b_copy, a_copy = copy.deepcopy(anchor), copy.deepcopy(augment)
        spec = CompositionSpec(anchor="bench/anchor", augment="bench/augment", **knobs)
        model = build_composed_model(spec, b_copy, a_copy)

        def compose_step(_: int, model=model) -> torch.Tensor:
            ids, targets = batch_of(rng.sample(compose_train, batch_size))
            logits = model(ids, **composed_context(model.mode, ids)).logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

        model.train()
        seconds[name] = train(compose_step, trainable_parameters(model), steps=steps[spec.mode], lr=2e-3, log=name)
        model.eval()
        generate = composed_greedy(model)
        rows[name] = {
            "heldout_keys": accuracy(generate, eval_heldout),
            "seen_keys_new_pairs": accuracy(generate, eval_seen),
        }
        params[name] = {
            "trainable": num_trainable(model),
            "total": num_total(model),
            "anchor": sum(p.numel() for p in b_copy.parameters()),
        }
        print(json.dumps({name: rows[name], "params": params[name]}), file=sys.stderr)

    result = {
        "benchmark": "composition_kv",
        "paper": {"anchor alone": 0.0, "augmenting model alone": 0.7, "calm": 84.3},
        "accuracy_percent": rows,
        "parents": parents,
        "parameters": params,
        "setup": {
            "keys": NUM_KEYS,
            "train_keys": len(train_keys),
            "heldout_keys": len(heldout_keys),
            "compose_train_examples": len(compose_train),
            "eval_heldout": len(eval_heldout),
            "eval_seen_keys_new_pairs": len(eval_seen),
            "steps": steps,
            "batch_size": batch_size,
            "anchor": "Llama 4 layers x 96",
            "augment": "Llama 4 layers x 64",
            "vocab": len(v),
            "calm": "layerSpacing 2: pairs (1,1), (3,3)",
            "codet5p": "crossAttentionLayers 1",
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": {k: round(s, 1) for k, s in seconds.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "| model | held-out keys | seen keys, new pairs | trainable params (share of total) |",
        "|---|---|---|---|",
    ]
    for name, row in result["accuracy_percent"].items():
        p = result["parameters"].get(name)
        share = f"{p['trainable']:,} ({100 * p['trainable'] / p['total']:.1f}%)" if p else "—"
        lines.append(f"| {name} | {row['heldout_keys']:.1f} | {row['seen_keys_new_pairs']:.1f} | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
