"""Build a small midfill export (random-init Llama + a BPE trained on stdlib sources) in seconds.

Used by the serving tests and bench/serve_throughput.py. The trainer is not imported (serving and
trainer never import each other); this writes the same export contract the trainer does
(midfill.export): safetensors + config + tokenizer + midfill.json.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from midfill.export import ExportMetadata, write_metadata
from midfill.fim import CODEGEN2, EOS, PAD, special_tokens

STDLIB_FILES = [
    "textwrap.py",
    "json/decoder.py",
    "json/encoder.py",
    "shlex.py",
    "fnmatch.py",
    "string.py",
    "csv.py",
    "glob.py",
]


def stdlib_texts(names: list[str] = STDLIB_FILES) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / n).read_text() for n in names]


def build_export(
    dst: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab_size: int = 1024,
    max_context: int = 256,
    seed: int = 0,
    texts: list[str] | None = None,
) -> Path:
    """Write a random-init CodeGen2-format export to dst and return dst."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dst.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(8)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts or stdlib_texts(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    hf_tok.save_pretrained(dst)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_context,
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(dst)
    write_metadata(
        dst,
        ExportMetadata(
            fim_format=CODEGEN2.name,
            sentinels={"eos": EOS, "pad": PAD, "sep": "<sep>", "eom": "<eom>"},
            stop_tokens=list(CODEGEN2.stop_tokens),
            max_context=max_context,
            recipe="debug",
        ),
    )
    return dst


def tiny_llama(vocab_size: int, *, max_positions: int = 256):
    """A random-init 2-layer Llama small enough to compare caches token by token (no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def build_composed_export(
    folder: Path,
    *,
    mode: str,
    anchor: Path,
    augment: Path,
    bridge_std: float | None,
    stop_tokens: list[str] | None = None,
):
    """A composed export (midfill.composition) of `mode` over the anchor registered as models:/anchor/1
    (its export folder `anchor`) and the local augmenting export `augment`, with the tokenizer both
    share; returns (folder, the composed model in eval mode). bridge_std gives the bridge's output
    projections random weights N(0, bridge_std) (a fresh bridge adds exactly zero, so the
    composition would compute its anchor and hide a broken bridge); None keeps them fresh."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from midfill.api.trainingrun import CompositionSpec
    from midfill.composition import build_composed_model, save_composed
    from midfill.export import read_metadata

    spec = CompositionSpec.model_validate(
        {"mode": mode, "anchor": "models:/anchor/1", "augment": str(augment), "layerSpacing": 1}
    )
    model = build_composed_model(
        spec, LlamaForCausalLM.from_pretrained(anchor), LlamaForCausalLM.from_pretrained(augment)
    )
    if bridge_std is not None:
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith("o_proj.weight"):
                    p.normal_(0, bridge_std)
    folder = save_composed(model, folder)
    for f in anchor.iterdir():  # the tokenizer both parents share
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    update: dict = {"recipe": f"composition:{mode}", "composition": {"mode": mode}}
    if stop_tokens is not None:
        update["stop_tokens"] = stop_tokens
    write_metadata(folder, read_metadata(anchor).model_copy(update=update))
    return folder, model.eval()
