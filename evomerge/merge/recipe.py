"""Merge recipes: what to merge and how, as data.

A recipe is built in code (the search decodes genomes into recipes) or parsed from mergekit merge
YAML, and serializes back to YAML that mergekit accepts. Parameter values follow mergekit:
- a scalar, or a list of numbers (a gradient: linear interpolation over the layers, position
  t = layer / (num_layers - 1); tensors outside the layers, such as embeddings, get t = 0);
- or a list of `{filter, value}` choices: the first whose `filter` is a substring of the tensor
  name (or that has no filter) gives the value.
Unlike mergekit, nothing is silently ignored: unknown keys, unknown parameters and parameters given
where the method does not read them are errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import RecipeError
from evomerge.merge.specs import METHODS, TENSOR, MethodSpec, tensor_method_names
from evomerge.registry import UnknownNameError

Value = float | bool | tuple[float, ...]  # scalar or gradient

DTYPES = ("float32", "float16", "bfloat16")
TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
# mergekit keys a whole-model Recipe does not take: named in the error so the user knows it is not a typo.
# `evomerge merge` runs slices, tokenizer and chat_template recipes through merge/slices.py instead.
KNOWN_UNSUPPORTED = {
    "slices": "layer-range recipes run with `evomerge merge` only; here use models: with per-layer gradients",
    "tokenizer": "tokenizer settings run with `evomerge merge` only",
    "chat_template": "chat templates are written by `evomerge merge` only",
    "modules": "per-module recipes (multimodal models) are not supported",
    "out_path": "a mergekit-multi key: give the output with `evomerge merge --out`",
    "name": "a mergekit-multi key (recipes chained by name) is not supported: run each recipe on its own",
}


def missing_parameter(spec: MethodSpec, shared: list[Mapping], inputs) -> tuple[str, str | None] | None:
    """The first required parameter (no default) that is set nowhere: (name, None) when a merge-wide one is in
    none of the `shared` scopes, (name, model) when a per-model one is in neither the model's parameters nor
    them; None when every one is set. `inputs`: entries with `.model` and `.parameters`."""
    for p in spec.params:
        if p.default is not None:
            continue
        if not p.per_model and not any(p.name in scope for scope in shared):
            return p.name, None
        if p.per_model:
            for entry in inputs:
                if not any(p.name in scope for scope in [entry.parameters, *shared]):
                    return p.name, entry.model
    return None


@dataclass(frozen=True)
class Choice:
    value: Value
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


Setting = tuple[Choice, ...]


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None  # output dtype (evomerge always computes in float32)
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", or a model; default: the base model, else the first

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        method: str,
        models: Mapping[str, Mapping[str, Any]] | Sequence[str],
        base_model: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> Recipe:
        """Recipe from plain Python values (scalars, lists as gradients, lists of {filter, value})."""
        if not isinstance(models, Mapping):
            models = {m: {} for m in models}
        entries = tuple(
            ModelEntry(m, {k: to_setting(v, f"models[{i}].parameters.{k}") for k, v in (p or {}).items()})
            for i, (m, p) in enumerate(models.items())
        )
        top = {k: to_setting(v, f"parameters.{k}") for k, v in (parameters or {}).items()}
        recipe = cls(method, entries, base_model, top, **kw)
        recipe.validate()
        return recipe

    @classmethod
    def from_mergekit(cls, data: Any, where: str = "recipe") -> Recipe:
        """Parse a mergekit merge YAML document (already loaded); `where` names it in errors."""
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping with merge_method and models")
        _check_keys(data, TOP_LEVEL_KEYS, where)
        if "merge_method" not in data:
            raise RecipeError(f"{where}: merge_method is missing: add e.g. 'merge_method: ties'")
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise RecipeError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
        entries = []
        for i, item in enumerate(models):
            at = f"{where}: models[{i}]"
            item = model_item(item, at, MODEL_KEYS)
            params = item.get("parameters") or {}
            if not isinstance(params, dict):
                raise RecipeError(f"{at}.parameters must be a mapping of parameter name to value")
            entries.append(ModelEntry(_model_ref(item["model"], f"{at}.model"), {k: to_setting(v, f"{at}.parameters.{k}") for k, v in params.items()}))
        top = data.get("parameters") or {}
        if not isinstance(top, dict):
            raise RecipeError(f"{where}: parameters must be a mapping of parameter name to value")
        recipe = cls(
            method=str(data["merge_method"]),
            models=tuple(entries),
            base_model=_model_ref(data["base_model"], f"{where}: base_model") if data.get("base_model") is not None else None,
            parameters={k: to_setting(v, f"{where}: parameters.{k}") for k, v in top.items()},
            dtype=_dtype(data.get("dtype"), f"{where}: dtype"),
            out_dtype=_dtype(data.get("out_dtype"), f"{where}: out_dtype"),
            tokenizer_source=_tokenizer_source(data.get("tokenizer_source"), where),
        )
        recipe.validate(where)
        return recipe

    # -- what the method sees ----------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def inputs(self) -> list[ModelEntry]:
        """The models the method combines, in order. For base-relative methods the base is left out;
        for linear a base_model counts as one more weighted input (as in mergekit)."""
        if self.spec.needs_base and not self.baseless:
            return [e for e in self.models if e.model != self.base_model]
        if self.baseless:
            return list(self.models)
        listed = [e.model for e in self.models]
        extra = [ModelEntry(self.base_model)] if self.base_model and self.base_model not in listed else []
        return list(self.models) + extra

    @property
    def baseless(self) -> bool:
        """A method mergekit also runs without a base (nuslerp, multislerp), given none: it combines the models'
        weights themselves."""
        return self.spec.base_optional and not self.base_model

    def model_names(self) -> list[str]:
        names = [e.model for e in self.models]
        if self.base_model and self.base_model not in names:
            names.insert(0, self.base_model)
        return names

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    def tokenizer_model(self) -> str:
        if self.tokenizer_source in (None, "base"):
            return self.base_model or self.models[0].model
        return self.tokenizer_source

    # -- validation --------------------------------------------------------------------------------
    def validate(self, where: str = "recipe") -> None:
        try:
            spec = METHODS[self.method]
        except UnknownNameError as e:
            raise RecipeError(f"{where}: merge_method: {e}") from None
        if spec.kind != TENSOR:  # dataflow documents have their own parser (dataflow_recipe.py)
            raise RecipeError(f"{where}: merge_method: {self.method} is not a parameter-space merge (it takes sources "
                              f"and a path, not models): use one of {', '.join(tensor_method_names())}")
        if spec.needs_base and not self.base_model and not spec.base_optional:
            raise RecipeError(f"{where}: {self.method} needs base_model: add 'base_model: PATH'")
        inputs = self.inputs()
        n = len(inputs)
        if want := spec.model_count_problem(n):
            extra = " besides the base model" if spec.needs_base and not self.baseless else ""
            raise RecipeError(f"{where}: {self.method} merges {want} model(s){extra}, got {n}")

        self.check_settings(spec, (self.parameters, f"{where}: parameters"),
                            [(entry.parameters, f"{where}: models[{i}].parameters") for i, entry in enumerate(self.models)])
        if missing := missing_parameter(spec, [self.parameters], inputs):
            name, model = missing
            if model is None:
                raise RecipeError(f"{where}: {self.method} needs parameter {name!r}: add it under the top-level parameters")
            raise RecipeError(f"{where}: model {model} has no {name!r} for {self.method}: add it to that model's "
                              "parameters or to the top-level parameters")

    @classmethod
    def check_settings(cls, spec: MethodSpec, shared: tuple[Mapping[str, Setting], str],
                       per_model: list[tuple[Mapping[str, Setting], str]]) -> None:
        """Every parameter of a shared block and of each model's block, as (settings, where) pairs, is one the
        method takes, at a level it may be set at, with a valid value."""
        blocks = [(*shared, True), *((settings, at, False) for settings, at in per_model)]
        for settings, at, top_level in blocks:
            for name, setting in settings.items():
                cls._check_param(spec, name, setting, f"{at}.{name}", top_level=top_level)

    @staticmethod
    def _check_param(spec: MethodSpec, name: str, setting: Setting, at: str, top_level: bool) -> None:
        p = spec.param(name)
        if p is None:
            valid = ", ".join(q.name for q in spec.params)
            raise RecipeError(f"{at}: {spec.name} has no parameter {name!r} (valid: {valid})")
        if not p.per_model and not top_level:
            raise RecipeError(f"{at}: {name!r} applies to the whole merge: move it to the top-level parameters")
        for choice in setting:
            values = choice.value if isinstance(choice.value, tuple) else (choice.value,)
            for v in values:
                if p.is_bool and not isinstance(v, bool):
                    raise RecipeError(f"{at}: expected true or false, got {v!r}")
                if not p.is_bool and isinstance(v, bool):
                    raise RecipeError(f"{at}: expected a number, got {v!r}")
                if (p.low is not None and v < p.low) or (p.high is not None and v > p.high):
                    raise RecipeError(f"{at}: {v} is outside [{p.low:g}, {p.high:g}]")

    # -- per-tensor resolution ---------------------------------------------------------------------
    def resolve(self, tensor_name: str, t: float) -> dict[str, Any]:
        """Keyword arguments of the method for one tensor at layer position t: every parameter of the method
        (omitted ones at their defaults), per-model ones as lists."""
        spec = self.spec
        inputs = self.inputs()
        kwargs: dict[str, Any] = {}
        for p in spec.params:
            if p.per_model:
                kwargs[p.arg] = [self._value(p.name, p.default, tensor_name, t, e) for e in inputs]
            else:
                kwargs[p.arg] = self._value(p.name, p.default, tensor_name, t, None)
        return kwargs

    def _value(self, name: str, default, tensor_name: str, t: float, entry: ModelEntry | None):
        for scope in ((entry.parameters if entry else {}), self.parameters):
            if name in scope:
                for choice in scope[name]:
                    if choice.matches(tensor_name):
                        return evaluate(choice.value, t)
        if default is None:  # reachable only when a filter list matched nothing
            raise RecipeError(f"no value of {name!r} applies to tensor {tensor_name}: add a choice without a filter")
        return default

    # -- serialization -----------------------------------------------------------------------------
    def to_mergekit(self) -> dict[str, Any]:
        """A mergekit merge YAML document (as a dict) for this recipe."""
        doc: dict[str, Any] = {"merge_method": self.method}
        if self.base_model:
            doc["base_model"] = self.base_model
        models = []
        for e in self.models:
            item: dict[str, Any] = {"model": e.model}
            if e.parameters:
                item["parameters"] = {k: from_setting(v) for k, v in e.parameters.items()}
            models.append(item)
        doc["models"] = models
        if self.parameters:
            doc["parameters"] = {k: from_setting(v) for k, v in self.parameters.items()}
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        return doc


def evaluate(value: Value, t: float) -> float | bool:
    """A scalar as is; a gradient [v0..vn-1] interpolated linearly at t in [0, 1]."""
    if not isinstance(value, tuple):
        return value
    if len(value) == 1:
        return value[0]
    s = t * (len(value) - 1)
    i0 = min(int(s), len(value) - 1)
    i1 = min(i0 + 1, len(value) - 1)
    f = s - i0
    return (1 - f) * value[i0] + f * value[i1]


_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to (the first `.N.` in its name), None outside the layers."""
    m = _LAYER.search(tensor_name)
    return None if m is None else int(m.group(1))


def layer_position(tensor_name: str, num_layers: int) -> float:
    """t of a tensor for gradients: layer i of L -> i / (L - 1) (1 if L == 1); other tensors -> 0."""
    i = layer_index(tensor_name)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def to_setting(raw: Any, at: str) -> Setting:
    if isinstance(raw, dict):
        raw = [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, dict) for x in raw):
        choices = []
        for i, item in enumerate(raw):
            _check_keys(item, ("filter", "value"), f"{at}[{i}]")
            if "value" not in item:
                raise RecipeError(f"{at}[{i}]: a filtered choice needs 'value'")
            f = item.get("filter")
            if f is not None and not isinstance(f, str):
                raise RecipeError(f"{at}[{i}].filter must be a string matched against tensor names, e.g. self_attn")
            choices.append(Choice(_value(item["value"], f"{at}[{i}].value"), f))
        return tuple(choices)
    return (Choice(_value(raw, at)),)


def _value(raw: Any, at: str) -> Value:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, list) and raw and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        return tuple(float(x) for x in raw)
    raise RecipeError(f"{at}: expected a number, true/false, or a list of numbers (a per-layer gradient), got {raw!r}")


def from_setting(setting: Setting) -> Any:
    def plain(v: Value):
        return list(v) if isinstance(v, tuple) else v

    if len(setting) == 1 and setting[0].filter is None:
        return plain(setting[0].value)
    return [({"filter": c.filter, "value": plain(c.value)} if c.filter is not None else {"value": plain(c.value)}) for c in setting]


def model_item(item: Any, at: str, keys: Sequence[str]) -> dict:
    """One entry of a `models:` list as a mapping (a bare string is {model: it}), its keys checked."""
    if isinstance(item, str):
        item = {"model": item}
    if not isinstance(item, dict) or "model" not in item:
        raise RecipeError(f"{at} must be a mapping with a 'model' key")
    _check_keys(item, keys, at)
    return item


def _check_keys(data: dict, allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key in allowed:
            continue
        if key in KNOWN_UNSUPPORTED:
            raise RecipeError(f"{where}: mergekit key {key!r} is not supported here: {KNOWN_UNSUPPORTED[key]}")
        raise RecipeError(f"{where}: unknown key {key!r} (valid keys: {', '.join(allowed)})")


def _model_ref(raw: Any, at: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise RecipeError(f"{at}: expected a model path")
    if "+" in raw:
        raise RecipeError(f"{at}: LoRA references (model+lora) are not supported: merge the adapter into the model first")
    return raw


def _dtype(raw: Any, at: str) -> str | None:
    if raw is None:
        return None
    name = str(raw).removeprefix("torch.")
    if name not in DTYPES:
        raise RecipeError(f"{at}: {raw!r} is not supported: use one of {', '.join(DTYPES)}")
    return name


def _tokenizer_source(raw: Any, where: str) -> str | None:
    if raw is None or raw == "base":
        return raw
    if raw == "union":
        raise RecipeError(f"{where}: tokenizer_source 'union' runs with `evomerge merge` only: use 'base' or a model "
                          "path here")
    return _model_ref(raw, f"{where}: tokenizer_source")
