"""mergekit `slices:` recipes: the output's layers as ranges of the sources' layers, merged slice by slice.

    slices:
      - sources:
          - model: ./a
            layer_range: [0, 24]     # [start, end): the same number of layers in every source of a slice
            parameters: {...}        # per-model parameters, as under `models:`
        base_model: ./a              # optional: this slice's base (default: the top-level base_model)
        parameters: {...}            # over the top-level parameters, under the model's own
      - sources: [{model: ./b, layer_range: [8, 32], parameters: {scale: 0.5}}]
    merge_method: passthrough        # copy (frankenmerge, depth up-scaling), or any tensor method

Semantics follow mergekit 0.1.5 (plan.py): output layers are numbered on through the slices, gradients
run over each slice (layer i of L: t = i / (L - 1), 1 if L == 1; embeddings and head: t = 0), the
embeddings come from the first slice's sources and the final norm and LM head from the last slice's, each
with that slice's parameters at t = 0 (a `scale` gradient in the last slice scales the head too).
Shared parameters match filters against the output tensor's name, per-model ones against that model's
input tensor name. A `models:` recipe is one slice over all layers, with the base appended if unlisted.
This module is pure: it parses, validates and plans; merge/slice_merge.py runs the plan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import RecipeError
from evomerge.merge.layer_path import PathStep
from evomerge.merge.recipe import (
    Recipe,
    Setting,
    _check_keys,
    _dtype,
    _model_ref,
    evaluate,
    from_setting,
    missing_parameter,
    model_item,
    to_setting,
)
from evomerge.merge.specs import METHODS, MethodSpec
from evomerge.merge.tokenizer_spec import TokenizerSpec, parse_tokenizer
from evomerge.registry import UnknownNameError

PASSTHROUGH = "passthrough"
TOP_KEYS = ("merge_method", "slices", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
# mergekit keys with no evomerge meaning: refused by name, never ignored
UNSUPPORTED = {
    "modules": "per-module recipes (multimodal models) are not supported: use slices: or models:",
    "residual_weight": "residual_weight is accepted but unused by mergekit 0.1.5: remove it",
}
_LAYER_NAME = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
# non-layer tensors mergekit counts as pre-weights (taken from the first slice); the others are post-weights
_PRE = ("embed", "wte", "wpe")
VOCAB_SUFFIXES = ("embed_tokens.weight", "wte.weight", "lm_head.weight")  # tensors with a row per token
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class SliceSource:
    model: str
    start: int
    end: int
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass(frozen=True)
class SlicesRecipe:
    method: str
    slices: tuple[Slice, ...]  # layer ranges resolved (a `models:` recipe: filled once layer counts are known)
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    @property
    def num_layers(self) -> int:
        return sum(s.length for s in self.slices)

    def weight_models(self) -> list[str]:
        """The models whose weights the recipe reads, base first (mergekit's donor of config and tokenizer)."""
        names = [self.base_model] if self.base_model else []
        names += [s.base_model for s in self.slices if s.base_model]
        names += [src.model for s in self.slices for src in s.sources]
        return list(dict.fromkeys(names))

    def model_names(self) -> list[str]:
        """Every model the recipe names: the weight models, then those named only for their tokenizer."""
        extra = self.tokenizer.models() if self.tokenizer is not None else []
        return list(dict.fromkeys([*self.weight_models(), *extra]))

    @property
    def donor(self) -> str:
        """The model whose config (and, without a tokenizer setting, tokenizer) the output takes."""
        return self.base_model or self.slices[0].sources[0].model

    def path(self) -> list[PathStep]:
        """Output layer k -> (model, layer) of the first source of its slice: the data-flow path the slices run."""
        return [PathStep(s.sources[0].model, s.sources[0].start + i) for s in self.slices for i in range(s.length)]

    def to_mergekit(self) -> dict[str, Any]:
        """The recipe as mergekit YAML (written next to the merge as mergekit_config.yml)."""
        slices = []
        for s in self.slices:
            item: dict[str, Any] = {"sources": []}
            for src in s.sources:
                entry: dict[str, Any] = {"model": src.model, "layer_range": [src.start, src.end]}
                if src.parameters:
                    entry["parameters"] = {k: from_setting(v) for k, v in src.parameters.items()}
                item["sources"].append(entry)
            if s.base_model:
                item["base_model"] = s.base_model
            if s.parameters:
                item["parameters"] = {k: from_setting(v) for k, v in s.parameters.items()}
            slices.append(item)
        doc: dict[str, Any] = {"slices": slices, "merge_method": self.method}
        if self.base_model:
            doc["base_model"] = self.base_model
        if self.parameters:
            doc["parameters"] = {k: from_setting(v) for k, v in self.parameters.items()}
        for key in ("dtype", "out_dtype", "chat_template"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.tokenizer is not None:
            doc.update(self.tokenizer.to_mergekit())
        return doc


# ---------------------------------------------------------------------------------------------- parsing


def needs_slices(data: Any) -> bool:
    """A mergekit document that the whole-model Recipe cannot run: slices, passthrough, a tokenizer or chat
    template setting, or a model@revision reference."""
    if not isinstance(data, dict):
        return False
    if any(k in data for k in ("slices", "tokenizer", "chat_template", "modules")) or data.get("merge_method") == PASSTHROUGH:
        return True
    if data.get("tokenizer_source") is not None:
        return True
    return "@" in repr([data.get("base_model"), data.get("models")])  # model@revision


def _check_supported(data: dict, allowed: Sequence[str], where: str) -> None:
    """Keys evomerge refuses by name first (they say why), then unknown ones."""
    for key in data:
        if key in UNSUPPORTED:
            raise RecipeError(f"{where}: mergekit key {key!r} is not supported by evomerge: {UNSUPPORTED[key]}")
    _check_keys(data, allowed, where)


def parse_slices(data: Any, where: str, layer_count) -> SlicesRecipe:
    """Parse a mergekit document (slices: or models:); layer_count(model) gives a model's layer count
    (called for `models:` recipes, whose ranges span every layer)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with merge_method and slices (or models)")
    _check_supported(data, TOP_KEYS, where)
    if "merge_method" not in data:
        raise RecipeError(f"{where}: merge_method is missing: add e.g. 'merge_method: passthrough'")
    method = str(data["merge_method"])
    try:
        spec = METHODS[method]
    except UnknownNameError as e:
        raise RecipeError(f"{where}: merge_method: {e}") from None
    if spec.kind != "tensor" and method != PASSTHROUGH:
        raise RecipeError(f"{where}: merge_method: {method} takes sources and a path, not slices: use passthrough "
                          "or a parameter-space method")
    if ("slices" in data) == ("models" in data):
        raise RecipeError(f"{where}: give exactly one of 'slices' (layer ranges) or 'models' (whole models)")
    base = _model_ref(data["base_model"], f"{where}: base_model") if data.get("base_model") is not None else None
    top = _params(data.get("parameters"), f"{where}: parameters")
    if "slices" in data:
        slices = _parse_slices(data["slices"], f"{where}: slices")
    else:
        slices = (_models_slice(data["models"], base, f"{where}: models", layer_count),)
    if "tokenizer_source" in data and "tokenizer" in data:
        raise RecipeError(f"{where}: give either tokenizer_source or tokenizer, not both (mergekit refuses both)")
    tokenizer = parse_tokenizer(data, where)
    chat = data.get("chat_template")
    if chat is not None and (not isinstance(chat, str) or not chat.strip()):
        raise RecipeError(f"{where}: chat_template must be 'auto', a template name or a Jinja string")
    recipe = SlicesRecipe(method, slices, base, top, _dtype(data.get("dtype"), f"{where}: dtype"),
                          _dtype(data.get("out_dtype"), f"{where}: out_dtype"), tokenizer, chat)
    validate(recipe, where)
    return recipe


def _params(raw: Any, at: str) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{at} must be a mapping of parameter name to value")
    return {k: to_setting(v, f"{at}.{k}") for k, v in raw.items()}


def _parse_slices(raw: Any, at: str) -> tuple[Slice, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{at} must be a non-empty list of {{sources: [{{model, layer_range}}]}}")
    out = []
    for i, item in enumerate(raw):
        where = f"{at}[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{where} must be a mapping with 'sources'")
        _check_supported(item, SLICE_KEYS, where)
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{where}.sources must be a non-empty list of {{model: PATH, layer_range: [START, END]}}")
        parsed = tuple(_source(s, f"{where}.sources[{j}]") for j, s in enumerate(sources))
        lengths = {s.end - s.start for s in parsed}
        if len(lengths) > 1:
            raise RecipeError(f"{where}: every source of a slice needs the same number of layers, got "
                              f"{', '.join(f'{s.model} [{s.start}, {s.end}]' for s in parsed)}")
        models = [s.model for s in parsed]
        dup = next((m for m in models if models.count(m) > 1), None)
        if dup is not None:
            raise RecipeError(f"{where}: model {dup} appears twice in one slice, which mergekit keys by model (one "
                              "range would be dropped): use a separate slice")
        slice_base = _model_ref(item["base_model"], f"{where}.base_model") if item.get("base_model") is not None else None
        out.append(Slice(parsed, slice_base, _params(item.get("parameters"), f"{where}.parameters")))
    return tuple(out)


def _source(raw: Any, at: str) -> SliceSource:
    if not isinstance(raw, dict) or "model" not in raw:
        raise RecipeError(f"{at} must be a mapping with 'model' and 'layer_range'")
    _check_keys(raw, SOURCE_KEYS, at)
    model = _model_ref(raw["model"], f"{at}.model")
    rng = raw.get("layer_range")
    if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
            or not 0 <= rng[0] < rng[1]):
        raise RecipeError(f"{at}.layer_range must be [START, END] with 0 <= START < END (END excluded), got {rng!r}")
    return SliceSource(model, rng[0], rng[1], _params(raw.get("parameters"), f"{at}.parameters"))


def _models_slice(raw: Any, base: str | None, at: str, layer_count) -> Slice:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{at} must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    sources = []
    for i, item in enumerate(raw):
        where = f"{at}[{i}]"
        item = model_item(item, where, ("model", "parameters"))
        model = _model_ref(item["model"], f"{where}.model")
        sources.append(SliceSource(model, 0, layer_count(model), _params(item.get("parameters"), f"{where}.parameters")))
    if base is not None and base not in [s.model for s in sources]:
        sources.append(SliceSource(base, 0, layer_count(base)))  # as mergekit: the base joins the inputs
    return Slice(tuple(sources))


# ---------------------------------------------------------------------------------------------- validation


def slice_base(recipe: SlicesRecipe, s: Slice) -> str | None:
    return s.base_model or recipe.base_model


def method_inputs(recipe: SlicesRecipe, s: Slice) -> list[SliceSource]:
    """The sources the method combines: all but the base for base-relative methods (as Recipe.inputs)."""
    base = slice_base(recipe, s)
    if recipe.spec.needs_base:
        return [src for src in s.sources if src.model != base]
    return list(s.sources)


def validate(recipe: SlicesRecipe, where: str) -> None:
    spec = recipe.spec
    for name, setting in recipe.parameters.items():
        Recipe._check_param(spec, name, setting, f"{where}: parameters.{name}", top_level=True)
    for i, s in enumerate(recipe.slices):
        at = f"{where}: slices[{i}]"
        if len({src.end - src.start for src in s.sources}) > 1:  # a models: recipe over models of other depths
            raise RecipeError(f"{at}: every model needs the same number of layers, got "
                              f"{', '.join(f'{src.model} ({src.end - src.start})' for src in s.sources)}")
        base = slice_base(recipe, s)
        if spec.needs_base:
            if base is None:
                raise RecipeError(f"{at}: {recipe.method} needs base_model: add 'base_model: PATH'")
            if base not in [src.model for src in s.sources]:
                raise RecipeError(f"{at}: base_model {base} is not among this slice's sources: add it with the "
                                  "same number of layers (mergekit reads the base's layers from the slice)")
        inputs = method_inputs(recipe, s)
        n = len(inputs)
        if want := spec.model_count_problem(n):
            extra = " besides the base model" if spec.needs_base else ""
            raise RecipeError(f"{at}: {recipe.method} merges {want} model(s){extra} per slice, got {n}")
        Recipe.check_settings(spec, (s.parameters, f"{at}.parameters"),
                              [(src.parameters, f"{at}.sources[{j}].parameters") for j, src in enumerate(s.sources)])
        if missing := missing_parameter(spec, [s.parameters, recipe.parameters], inputs):
            name, model = missing
            if model is None:
                raise RecipeError(f"{at}: {recipe.method} needs parameter {name!r}: add it to the slice's or the "
                                  "top-level parameters")
            raise RecipeError(f"{at}: model {model} has no {name!r} for {recipe.method}: add it to that source's, "
                              "the slice's or the top-level parameters")


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs of a model: its tensor names (in checkpoint order) and layer count."""

    names: tuple[str, ...]
    num_layers: int


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: the method over (model, input tensor name) pairs, parameters resolved."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # the method's inputs, in order
    reference: tuple[str, str]  # the tensor deltas are taken against (the base; else the first input)
    params: Mapping[str, Any]  # the tensor function's keywords (per-model ones as lists over inputs)
    group: tuple[str, ...]  # models whose rows fill a vocabulary tensor's missing tokens (mergekit's gather)
    base_model: str | None
    vocab: bool = False


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers', 3, 'mlp.up_proj.weight'); None outside layers."""
    m = _LAYER_NAME.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _layer_names(info: ModelInfo, layer: int, model: str, at: str) -> dict[str, str]:
    """suffix -> full name of one layer's tensors."""
    if not 0 <= layer < info.num_layers:
        raise RecipeError(f"{at}: model {model} has layers 0..{info.num_layers - 1}, so layer_range reaches past its "
                          f"last layer ({layer}): shorten the range")
    out = {}
    for n in info.names:
        parts = split_layer_name(n)
        if parts is not None and parts[1] == layer:
            out[parts[2]] = n
    return out


def plan(recipe: SlicesRecipe, infos: Mapping[str, ModelInfo], where: str = "recipe") -> list[TensorJob]:
    """Every output tensor, in mergekit's order: pre-weights, the slices' layers, post-weights."""
    jobs: list[TensorJob] = []
    first, last = recipe.slices[0], recipe.slices[-1]
    first_names = infos[first.sources[0].model].names
    non_layer = [n for n in first_names if split_layer_name(n) is None]
    pre = [n for n in non_layer if any(p in n for p in _PRE)]
    post = [n for n in non_layer if n not in pre]
    # the LM head is written when any model of the last slice has one (a tied model lends its embeddings)
    last_models = [src.model for src in last.sources][: len(first.sources)]
    if HEAD not in post and any(HEAD in infos[m].names for m in last_models):
        post.append(HEAD)
    elif HEAD in post and not any(HEAD in infos[m].names for m in last_models):
        post.remove(HEAD)
    for name in pre:
        jobs.append(_job(recipe, first, first.sources, {s.model: name for s in first.sources}, name, 0.0, infos, where))
    k = 0
    for i, s in enumerate(recipe.slices):
        at = f"{where}: slices[{i}]"
        for idx in range(s.length):
            t = idx / (s.length - 1) if s.length > 1 else 1.0
            per_source = [_layer_names(infos[src.model], src.start + idx, src.model, at) for src in s.sources]
            prefix = split_layer_name(next(iter(per_source[0].values())))[0]
            for suffix in per_source[0]:
                names = {}
                for src, layer in zip(s.sources, per_source):
                    if suffix not in layer:
                        raise RecipeError(f"{at}: model {src.model} has no tensor {suffix} in layer {src.start + idx}: "
                                          "the sources of a slice must share their layers' tensors")
                    names[src.model] = layer[suffix]
                jobs.append(_job(recipe, s, s.sources, names, f"{prefix}.{k}.{suffix}", t, infos, where))
            k += 1
    post_sources = last.sources[: len(first.sources)]  # mergekit plans post-weights with the first slice's count
    for name in post:
        names = {src.model: _head_name(name, infos[src.model], first_names) for src in post_sources}
        jobs.append(_job(recipe, last, post_sources, names, name, 0.0, infos, where))
    return jobs


def _head_name(name: str, info: ModelInfo, first_names: Sequence[str]) -> str:
    if name in info.names or name != HEAD:
        return name
    embed = next((n for n in first_names if n.endswith(VOCAB_SUFFIXES[:2])), name)  # a tied model's head
    return embed


def _job(recipe: SlicesRecipe, s: Slice, sources: Sequence[SliceSource], names: Mapping[str, str], out_name: str,
         t: float, infos: Mapping[str, ModelInfo], where: str) -> TensorJob:
    spec = recipe.spec
    base = slice_base(recipe, s)
    for src in sources:
        if names[src.model] not in infos[src.model].names:
            raise RecipeError(f"{where}: model {src.model} has no tensor {names[src.model]}, which the output's "
                              f"{out_name} needs")
    if spec.needs_base:
        inputs = [src for src in sources if src.model != base]
        reference = base
    else:
        inputs = list(sources)
        reference = base if base in [src.model for src in sources] else sources[0].model
    params: dict[str, Any] = {}
    for p in spec.params:
        if p.per_model:
            params[p.arg] = [_lookup(p.name, p.default, [src.parameters, s.parameters, recipe.parameters],
                                     names[src.model], t, f"{src.model}.{names[src.model]}") for src in inputs]
        else:
            params[p.arg] = _lookup(p.name, p.default, [s.parameters, recipe.parameters], out_name, t, out_name)
    return TensorJob(out_name, tuple((src.model, names[src.model]) for src in inputs), (reference, names[reference]),
                     params, tuple(src.model for src in sources), base, out_name.endswith(VOCAB_SUFFIXES))


def _lookup(name: str, default, scopes: Sequence[Mapping[str, Setting]], tensor_name: str, t: float, at: str):
    """First scope whose setting has a choice matching the tensor (mergekit: a scope where nothing matches is
    skipped), else the default."""
    for scope in scopes:
        for choice in scope.get(name, ()):
            if choice.matches(tensor_name):
                return evaluate(choice.value, t)
    if default is None:
        raise RecipeError(f"no value of {name!r} applies to {at}: add a choice without a filter")
    return default

