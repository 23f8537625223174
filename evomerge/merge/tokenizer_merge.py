"""The output tokenizer of a merge, and each model's embedding rows moved to its vocabulary (mergekit 0.1.5).

- base: the base model's tokenizer (else the first model's); union: it plus every token another model
  has and it lacks (plain tokens first, then added tokens, models in recipe order); MODEL: that model's.
  Tokens named under `tokenizer.tokens` are added when missing.
- Every tensor with a row per token (embeddings, LM head) is rebuilt per model on the output vocabulary.
  A model keeps its own row for each token it has. A token some model lacks gets one shared row, used by
  the models that lack it: the row of the only model that has it; else the base's row if the base has it;
  else the mean over the models that have it; zeros if none has it. A `tokens:` entry sets that row
  instead (and with force: true, for every model). Padding rows get the mean of the real rows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import RecipeError
from evomerge.merge.tokenizer_spec import TokenizerSpec


@dataclass
class OutputVocabulary:
    tokenizer: object  # transformers tokenizer, as it will be saved
    vocab: dict[str, int]  # token -> output id
    size: int  # rows of the output embeddings (len(vocab), padded)
    rows: dict[str, torch.Tensor]  # model -> (size,) its row of each output token, -1 where it lacks it
    original: dict[str, dict[str, int]]  # model -> its own vocabulary
    spec: TokenizerSpec


def _load(path: Path, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{where}: cannot load the tokenizer of {path}: {' '.join(str(e).split())[:200]}") from None


def _vocab_size(path: Path) -> int | None:
    from evomerge.io.documents import read_model_config

    if not (path / "config.json").is_file():
        return None  # a tokenizer-only folder (a tokenizer_source): every token counts
    cfg = read_model_config(path)
    return cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))


def build_vocabulary(spec: TokenizerSpec, base: str, models: Sequence[str], paths: Mapping[str, Path],
                     where: str) -> OutputVocabulary:
    """The output tokenizer and every model's row map. base: the base model (else the first model)."""
    from tokenizers import AddedToken

    tokenizers = {m: _load(paths[m], f"{where}: model {m}") for m in dict.fromkeys([base, *models])}
    sizes = {m: _vocab_size(paths[m]) or len(tokenizers[m].get_vocab()) for m in tokenizers}
    beyond = [t for t, i in tokenizers[base].get_vocab().items() if i >= sizes[base]]
    if beyond and spec.source in ("base", "union"):
        raise RecipeError(f"{where}: tokenizer: the tokenizer of {base} has {len(beyond)} token(s) with ids at or past "
                          f"its vocab_size {sizes[base]} (e.g. {beyond[0]!r}); stripping them is not supported: use "
                          "tokenizer_source: MODEL with a tokenizer that fits its model")
    if spec.source == "base":
        out = _copy(tokenizers[base])
    elif spec.source == "union":
        out = _copy(tokenizers[base])
        have = set(out.get_vocab())
        added: dict[str, object] = {}
        for m, tok in tokenizers.items():
            specials = {info.content for info in tok.added_tokens_decoder.values()}
            for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
                if i < sizes[m] and t not in specials and t not in have:
                    out.add_tokens(t)
                    have.add(t)
            for i, info in sorted(tok.added_tokens_decoder.items()):
                if i < sizes[m]:
                    added.setdefault(info.content, info)
        for info in added.values():
            if info.content not in have:
                out.add_tokens(AddedToken(info.content, single_word=info.single_word, lstrip=info.lstrip,
                                          rstrip=info.rstrip, normalized=info.normalized, special=info.special),
                               special_tokens=info.special)
                have.add(info.content)
    else:
        if spec.source not in paths:
            raise RecipeError(f"{where}: tokenizer source {spec.source} is not a loaded model")
        out = _copy(_load(paths[spec.source], f"{where}: tokenizer source {spec.source}"))
    have = set(out.get_vocab())
    for t in spec.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)

    vocab = out.get_vocab()
    size = len(vocab)
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    rows = {}
    for m, tok in tokenizers.items():
        own = tok.get_vocab()
        r = torch.full((size,), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = own.get(t, -1)
            r[i] = j if j < sizes[m] else -1
        rows[m] = r
    return OutputVocabulary(out, vocab, size, rows, {m: tok.get_vocab() for m, tok in tokenizers.items()}, spec)


def _copy(tokenizer):
    """A fresh copy (tokens are added to it; the model's own stays as loaded)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def remap_rows(vocab: OutputVocabulary, tensors: Mapping[str, torch.Tensor], base: str | None,
               where: str) -> dict[str, torch.Tensor]:
    """Each model's vocabulary tensor (rows = its tokens) rebuilt on the output vocabulary; tensors: the models
    of one output tensor's merge (their order decides the mean's summation order, as in mergekit)."""
    models = list(tensors)
    n = len(vocab.vocab)
    ids = torch.arange(n)
    present = torch.stack([vocab.rows[m][:n] >= 0 for m in models])  # (models, n)
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    shape = tensors[models[0]].shape[1:]
    forced = torch.zeros(n, dtype=torch.bool)
    for tok, setting in vocab.spec.tokens.items():
        if setting.force:
            forced[vocab.vocab[tok]] = True
    need = (~present.all(0)) | forced
    shared = torch.zeros((n, *shape), dtype=dtype)
    for i in ids[need].tolist():
        tok = _token_at(vocab, i)
        setting = vocab.spec.tokens.get(tok)
        if setting is not None:
            shared[i] = _configured_row(vocab, tensors, setting, tok, i, where)
            continue
        has = present[:, i]
        count = int(has.sum())
        if count == 1:
            m = models[int(has.nonzero()[0])]
            shared[i] = tensors[m][vocab.rows[m][i]]
        elif count == 0:
            continue  # zeros: no model has this token
        elif base in models and vocab.rows[base][i] >= 0:
            shared[i] = tensors[base][vocab.rows[base][i]]
        else:
            acc = torch.zeros(shape, dtype=dtype)
            for m in models:
                if vocab.rows[m][i] >= 0:
                    acc = acc + tensors[m][vocab.rows[m][i]]
            shared[i] = acc / count
    out = {}
    for k, m in enumerate(models):
        new = torch.zeros((vocab.size, *shape), dtype=dtype)
        own = present[k] & ~forced
        new[:n][own] = tensors[m][vocab.rows[m][:n][own]].to(dtype)
        new[:n][~own] = shared[~own]
        if vocab.size > n:
            new[n:] = new[:n].mean(0)
        out[m] = new
    return out


def _token_at(vocab: OutputVocabulary, i: int) -> str:
    if not hasattr(vocab, "_inverse"):
        vocab._inverse = {v: k for k, v in vocab.vocab.items()}  # type: ignore[attr-defined]
    return vocab._inverse[i]  # type: ignore[attr-defined]


def _configured_row(vocab: OutputVocabulary, tensors: Mapping[str, torch.Tensor], setting, tok: str, i: int,
                    where: str) -> torch.Tensor:
    src = setting.source
    first = next(iter(tensors.values()))
    if src.kind == "zero":
        return first.new_zeros(first.shape[1:])
    if src.model not in tensors:
        raise RecipeError(f"{where}: tokenizer.tokens[{tok!r}]: model {src.model} is not among the models merged "
                          "into this tensor: name one of the slice's models")
    table = tensors[src.model]
    if src.kind == "model":
        j = int(vocab.rows[src.model][i])
        if j < 0:
            raise RecipeError(f"{where}: tokenizer.tokens[{tok!r}]: model {src.model} has no token {tok!r}: use "
                              "{kind: model_token, ...} or another model")
        return table[j]
    j = src.token_id if src.token_id is not None else vocab.original[src.model].get(src.token, -1)
    if not 0 <= j < table.shape[0]:
        raise RecipeError(f"{where}: tokenizer.tokens[{tok!r}]: model {src.model} has no token "
                          f"{src.token if src.token is not None else src.token_id!r}")
    return table[j]
