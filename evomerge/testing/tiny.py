"""Tiny model families built on the fly, for tests and benchmarks (no downloads).

A family is a random base model plus sources that are the base plus a random task vector, so
merges of them behave like merges of fine-tunes. Every model directory is written by transformers'
own `save_pretrained` (so our reader is tested against the reference writer) and carries a byte-level
BPE tokenizer trained locally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "12 plus 34 is 46. 7 plus 8 is 15. 40 plus 9 is 49.",
    "ki ra is 12. mu te is 34. so ra is 5.",
    "merging models averages what they learned, if their weights line up",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
]


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    hidden: int = 32
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 64
    vocab: int = 320
    tie_embeddings: bool = False
    norm_eps: float | None = None  # None: the architecture's default (1e-6 / 1e-5)


@dataclass
class Family:
    base: Path
    sources: list[Path] = field(default_factory=list)


def train_tokenizer(out: str | Path, vocab_size: int = 300):
    """Train a byte-level BPE tokenizer on a small built-in corpus and save it to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return fast


def build_config(spec: TinySpec, vocab_size: int):
    import transformers

    eps = {} if spec.norm_eps is None else {"layer_norm_epsilon" if spec.arch == "gpt2" else "rms_norm_eps": spec.norm_eps}
    if spec.arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
            n_inner=spec.intermediate, n_positions=128, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=True, **eps,
        )
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    if spec.arch not in cls:
        raise ValueError(f"unknown tiny architecture {spec.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return cls[spec.arch](
        vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=spec.tie_embeddings, **eps,
    )


def random_model(spec: TinySpec, seed: int, vocab_size: int | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = build_config(spec, vocab_size or spec.vocab)
    return AutoModelForCausalLM.from_config(config).eval()


def make_family(
    root: str | Path,
    spec: TinySpec = TinySpec(),
    n_sources: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    task_scale: float = 0.02,
    shard_size: str | int | None = None,
) -> Family:
    """Write `root/base` and `root/source_i`: source_i = base + task vector (N(0, task_scale^2) noise)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    tokenizer = train_tokenizer(tok_dir)
    vocab = max(spec.vocab, len(tokenizer))
    base = random_model(spec, seed, vocab)
    family = Family(base=save_model(base, root / "base", tok_dir, dtype, shard_size))
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(n_sources):
        model = random_model(spec, seed, vocab)  # same init as base, then shifted
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * task_scale)
        family.sources.append(save_model(model, root / f"source_{i}", tok_dir, dtype, shard_size))
    return family


def save_model(
    model, out: Path, tok_dir: Path, dtype: torch.dtype = torch.float32, shard_size: str | int | None = None
) -> Path:
    """Write model (cast to dtype) and the tokenizer in tok_dir as a Hugging Face directory."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise in tests and the demo
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size is not None else {}
    model.save_pretrained(out, **kwargs)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out
