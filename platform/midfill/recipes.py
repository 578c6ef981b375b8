"""Named model sizes (Llama-style decoders, CodeGen2.5-like geometry at the top end).

`debug` is the 5.3M-parameter model of docs/cpu-notes.md (4 layers, width 256, 4 heads, context 512,
tied embeddings at vocab 8192): it trains in minutes on 2 CPU cores. The others follow the usual
Llama/CodeGen2.5 shapes; `7b` is CodeGen2.5-7B's geometry with a 4096-token context.

They live in the core (no torch) so that `midfill validate` can size a run before anything starts;
the trainer builds its models from them (trainer/model.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from midfill.api.trainingrun import Architecture


@dataclass(frozen=True)
class Recipe:
    """Geometry of a decoder; vocab size comes from the tokenizer."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def with_overrides(self, arch: Architecture) -> Recipe:
        """The recipe with the spec's model.architecture fields applied."""
        changes = {k: v for k, v in arch.model_dump().items() if v is not None}
        out = replace(self, **changes)
        if out.hidden_size % out.num_heads or out.num_heads % out.num_kv_heads:
            raise ValueError(
                f"model.architecture: hiddenSize {out.hidden_size}, numHeads {out.num_heads} and "
                f"numKvHeads {out.num_kv_heads} must divide evenly (set them together)"
            )
        return out

    def num_params(self, vocab_size: int) -> int:
        """Parameter count (weights only, no buffers)."""
        head_dim = self.hidden_size // self.num_heads
        attn = self.hidden_size * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        embed = vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + self.hidden_size


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("debug", 256, 4, 4, 4, 688, 512, tie_word_embeddings=True),
        Recipe("125m", 768, 12, 12, 12, 2048, 2048, tie_word_embeddings=True),
        Recipe("350m", 1024, 24, 16, 16, 2816, 2048),
        Recipe("1b", 2048, 16, 16, 16, 5632, 2048),
        Recipe("3.7b", 3072, 26, 24, 24, 8192, 2048),
        Recipe("7b", 4096, 32, 32, 32, 11008, 4096),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; ValueError naming the choices otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"model.recipe: unknown recipe {name!r}; use one of {', '.join(RECIPES)}") from None
