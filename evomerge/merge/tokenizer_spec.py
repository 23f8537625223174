"""The output tokenizer a mergekit recipe asks for (`tokenizer_source:` or the `tokenizer:` block), as data.

    tokenizer_source: base | union | MODEL
    tokenizer:
      source: union                 # base | union | MODEL (default union)
      tokens:                       # rows of the embeddings for these tokens (added when missing)
        <|im_start|>:
          source: MODEL             # that model's row for the same token; or {kind: zero};
          force: true               # or {kind: model_token, model: M, token: T | token_id: N}
      pad_to_multiple_of: 64        # extra rows get the mean embedding

Torch-free; merge/tokenizer_merge.py builds the tokenizer and the embedding rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import RecipeError

BLOCK_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")


@dataclass(frozen=True)
class TokenSource:
    kind: str  # "model": that model's row for the same token; "model_token": a given token of a model; "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    def to_mergekit(self) -> Any:
        if self.kind == "model":
            return self.model
        if self.kind == "zero":
            return {"kind": "zero"}
        out: dict[str, Any] = {"kind": "model_token", "model": self.model}
        out.update({"token": self.token} if self.token is not None else {"token_id": self.token_id})
        return out


@dataclass(frozen=True)
class TokenSetting:
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "base", "union" or a model reference
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    block: bool = False  # written as `tokenizer:` (else `tokenizer_source:`)

    def models(self) -> list[str]:
        refs = [] if self.source in ("base", "union") else [self.source]
        refs += [t.source.model for t in self.tokens.values() if t.source is not None and t.source.model]
        return refs

    def to_mergekit(self) -> dict[str, Any]:
        if not self.block:
            return {"tokenizer_source": self.source}
        block: dict[str, Any] = {"source": self.source}
        if self.tokens:
            block["tokens"] = {tok: {**({"source": s.source.to_mergekit()} if s.source else {}),
                                     **({"force": True} if s.force else {})} for tok, s in self.tokens.items()}
        if self.pad_to_multiple_of is not None:
            block["pad_to_multiple_of"] = self.pad_to_multiple_of
        return {"tokenizer": block}


def parse_tokenizer(data: Mapping[str, Any], where: str) -> TokenizerSpec | None:
    from evomerge.merge.recipe import _check_keys, _model_ref

    if data.get("tokenizer_source") is not None:
        return TokenizerSpec(_source(data["tokenizer_source"], f"{where}: tokenizer_source", _model_ref))
    raw = data.get("tokenizer")
    if raw is None:
        return None
    at = f"{where}: tokenizer"
    if not isinstance(raw, dict):
        raise RecipeError(f"{at} must be a mapping with source, tokens, pad_to_multiple_of")
    _check_keys(raw, BLOCK_KEYS, at)
    source = _source(raw.get("source", "union"), f"{at}.source", _model_ref)
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"{at}.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens_raw = raw.get("tokens") or {}
    if not isinstance(tokens_raw, dict):
        raise RecipeError(f"{at}.tokens must be a mapping of token -> {{source, force}}")
    tokens = {}
    for tok, cfg in tokens_raw.items():
        tat = f"{at}.tokens[{tok!r}]"
        cfg = cfg or {}
        if not isinstance(cfg, dict):
            raise RecipeError(f"{tat} must be a mapping with source and force")
        _check_keys(cfg, TOKEN_KEYS, tat)
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{tat}.force must be true or false")
        src = cfg.get("source")
        if src is None:
            raise RecipeError(f"{tat}: source is missing: name a model, {{kind: zero}} or {{kind: model_token, ...}}")
        tokens[str(tok)] = TokenSetting(_token_source(src, f"{tat}.source", _model_ref), force)
    return TokenizerSpec(source, tokens, pad, block=True)


def _source(raw: Any, at: str, model_ref) -> str:
    if raw in ("base", "union"):
        return raw
    return model_ref(raw, at)


def _token_source(raw: Any, at: str, model_ref) -> TokenSource:
    from evomerge.merge.recipe import _check_keys

    if isinstance(raw, str):
        return TokenSource("model", model=model_ref(raw, at))
    if not isinstance(raw, dict) or raw.get("kind") not in ("zero", "model_token"):
        raise RecipeError(f"{at}: expected a model, {{kind: zero}} or {{kind: model_token, model, token|token_id}}")
    if raw["kind"] == "zero":
        _check_keys(raw, ("kind",), at)
        return TokenSource("zero")
    _check_keys(raw, ("kind", "model", "token", "token_id"), at)
    if ("token" in raw) == ("token_id" in raw):
        raise RecipeError(f"{at}: give exactly one of token or token_id")
    tid = raw.get("token_id")
    if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
        raise RecipeError(f"{at}.token_id must be a non-negative integer")
    return TokenSource("model_token", model=model_ref(raw.get("model"), f"{at}.model"),
                       token=None if raw.get("token") is None else str(raw["token"]), token_id=tid)
