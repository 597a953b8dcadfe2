"""The one config engine behind the job config, the model config and ``MergeConfig``.

Each config is a tree of :class:`Section` subclasses (pydantic v2 models). A key is one typed
attribute with its default, followed by its docstring; limits go in ``Field(ge=..., le=...)``
and rules that span keys in an ``after`` model validator raising :class:`Invalid`::

    class ChunkSection(Section):
        overlap: int = Field(30, ge=1)
        \"\"\"Frames shared by consecutive chunks.\"\"\"

The rules are the same in every config:

- unknown keys are refused, with a "did you mean" suggestion;
- numbers: an ``int`` key takes an integer or a whole-valued float (``2`` or ``2.0``, never
  ``2.5``); a ``float`` key takes an integer or a float and stores a float; never ``true``, a
  string such as ``"2"``, ``inf`` or ``nan``;
- ``true``/``false`` keys take only booleans, string keys only strings, a ``Literal`` key one
  of its values; a section given as ``null`` is its defaults, a list is taken for a tuple;
- configs are frozen values (compare, hash and pickle by value).

Every failure raises :class:`~httm_dist.errors.ConfigError` with one line naming the dotted
key (``'chunk.overlap' must be >= 1, got 0``), which the CLI prints before exiting with 2.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from httm_dist.errors import ConfigError

__all__ = ["Invalid", "Section", "closest", "describe", "unknown_key"]


class Invalid(ValueError):
    """Raised by a section's validators: ``key`` (dotted, relative to the section; ``""`` for
    the validated field itself) breaks the rule ``why`` (a phrase that follows the key)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"'{key}' {why}")
        self.key, self.why = key, why


class Section(BaseModel):
    """Base of every config section: the shared rules of the module doc.

    ``root`` is the dotted name errors start with when this class is validated on its own
    (``"merging"`` for ``MergeConfig``; empty for a top-level config).
    """

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        protected_namespaces=(),
    )
    root: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc, type(self)) from None

    # Nested sections are validated by pydantic itself (not through this __init__), so their
    # errors keep the full dotted location; pydantic's RootModel marks its __init__ the same way.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> Any:
        """Build from a plain mapping (YAML/JSON); ``None`` means all defaults.

        Raises ConfigError naming the first bad key."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"'{cls.root or 'config'}' must be a mapping of keys, got {type(data).__name__}"
            )
        return cls(**{str(k): v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that :meth:`from_dict` turns into an equal
        config; a new object each call, safe to modify."""
        return self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _plain_input(cls, data: Any) -> Any:
        """``null`` -> defaults; whole floats -> int for int keys; lists -> tuples."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            return data  # pydantic reports "must be a mapping"
        fields = cls.model_fields
        return {k: _normalise(fields[k].annotation, v) if k in fields else v for k, v in data.items()}


def _normalise(annotation: Any, value: Any) -> Any:
    """Apply the number and sequence rules of the module doc to ``value`` for ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _normalise(args[0], value)
    if origin in (Union, types.UnionType):
        for arg in args:
            new = _normalise(arg, value)
            if new is not value:
                return new
        return value
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        items = [_normalise(item, v) for v in value]
        return tuple(items) if origin is tuple else items
    return value


# --------------------------------------------------------------------------- errors


def closest(name: str, names: Sequence[str]) -> Optional[str]:
    """The one of ``names`` closest to ``name`` (a likely typo of it), or None."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return close[0] if close else None


def unknown_key(dotted: str, valid: Sequence[str], prefix: str) -> ConfigError:
    """The error for an unknown key ``dotted`` among ``valid`` (the names allowed where it
    sits, whose dotted prefix is ``prefix``), with the closest valid key as a suggestion."""
    close = closest(dotted.rsplit(".", 1)[-1], valid)
    hint = f"; did you mean '{prefix}{close}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(
        f"unknown config key '{dotted}'{hint} (valid keys in {section}: {', '.join(sorted(valid))})"
    )


def _config_error(exc: ValidationError, cls: type[Section]) -> ConfigError:
    """One line for the most telling error of ``exc`` (pydantic lists them in field order)."""
    # Unknown keys first (a typo explains the rest), then wrong types and values, then missing keys.
    rank = {"extra_forbidden": 0, "value_error": 2, "missing": 3}
    errors = sorted(exc.errors(), key=lambda e: rank.get(e["type"], 1))
    first = _walk(cls, errors[0]["loc"])[0]
    # A union key (``layers: 'all' | list``) fails once per member: the member that got as far
    # as an item names the item ("'merging.layers[1]' must be an integer").
    same = [e for e in errors if _walk(cls, e["loc"])[0] == first]
    err = next((e for e in same if any(isinstance(p, int) for p in e["loc"])), errors[0])
    names, annotation, index = _walk(cls, err["loc"])
    names = [cls.root, *names] if cls.root else names
    dotted = ".".join(names) + ("" if index is None else f"[{index}]")
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _owner(cls, err["loc"][:-1])
        prefix = ".".join(names) + "." if names else ""
        return unknown_key(f"{prefix}{err['loc'][-1]}", list(owner.model_fields), prefix)
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        key = ".".join(n for n in (".".join(names), cause.key) if n)
        return ConfigError(f"'{key}' {cause.why}")
    if isinstance(cause, ConfigError):  # a validator's own complete message (unknown_key)
        return cause
    if kind == "missing":
        field = _owner(cls, err["loc"][:-1]).model_fields[err["loc"][-1]]
        what = " ".join((field.description or "").split()).rstrip(".")
        return ConfigError(f"'{dotted}' is required" + (f": {what}" if what else ""))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return ConfigError(f"'{dotted}' must be {_bounds(cls, err['loc'], err['ctx'])}, got {value!r}")
    if kind == "finite_number":
        return ConfigError(f"'{dotted}' must be a finite number, got {value!r}")
    if kind in ("value_error", "assertion_error"):
        return ConfigError(f"'{dotted}' {err['msg'].removeprefix('Value error, ')}")
    if index is not None:
        annotation = _item_type(annotation)
    return ConfigError(f"'{dotted or 'config'}' must be {describe(annotation)}, got {value!r}")


def _walk(cls: type[Section], loc: Sequence[Any]) -> tuple[list[str], Any, Optional[int]]:
    """The field names along ``loc``, the annotation of the last one and the list index in it
    (union member tags such as ``'tuple[int, ...]'`` are skipped)."""
    names: list[str] = []
    model: Optional[type[Section]] = cls
    annotation: Any = None
    index: Optional[int] = None
    for part in loc:
        if isinstance(part, int):
            index = part
        elif model is not None and part in model.model_fields:
            names.append(part)
            annotation = model.model_fields[part].annotation
            model = _section_of(annotation)
    return names, annotation, index


def _section_of(annotation: Any) -> Optional[type[Section]]:
    """The Section class inside ``annotation`` (``X``, ``Optional[X]``), or None."""
    for tp in (annotation, *typing.get_args(annotation)):
        if isinstance(tp, type) and issubclass(tp, Section):
            return tp
    return None


def _owner(cls: type[Section], loc: Sequence[Any]) -> type[Section]:
    """The section class reached by following the field names of ``loc`` from ``cls``."""
    model = cls
    for part in loc:
        if isinstance(part, str) and part in model.model_fields:
            model = _section_of(model.model_fields[part].annotation) or model
    return model


def _bounds(cls: type[Section], loc: Sequence[Any], ctx: Mapping[str, Any]) -> str:
    """All limits of the field at ``loc`` ("> 0 and <= 1"), so one message states the range."""
    owner = _owner(cls, [p for p in loc[:-1] if isinstance(p, str)])
    field = owner.model_fields.get(next((p for p in reversed(loc) if isinstance(p, str)), ""))
    found = []
    for meta in field.metadata if field is not None else ():
        for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(meta, getattr(annotated_types, name.capitalize())):
                found.append(f"{sign} {getattr(meta, name)}")
    if not found:  # a limit on a list item: only pydantic's context knows it
        found = [f"{sign} {ctx[name]}" for name, sign in
                 (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if name in ctx]
    return " and ".join(found)


def _item_type(annotation: Any) -> Any:
    """The item type of the list/tuple inside ``annotation`` (which may be a union)."""
    for tp in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp):
            return typing.get_args(tp)[0]
    return annotation


def describe(annotation: Any) -> str:
    """What a value of type ``annotation`` is, in the words of an error message."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is Literal:
        return "one of " + " | ".join(repr(a) for a in args) if len(args) > 1 else repr(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        return "a list of " + describe(args[0]).replace("an integer", "integers").replace(
            "a string", "strings")
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "a mapping of keys"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            dict: "a mapping", type(None): "null", None: "null"}.get(annotation, str(annotation))
