"""Analyses declared once: the registry the CLI, the job runner, studies and the app read.

Every analysis module declares its job with `@analysis(...)` on the function that runs it as a
run directory. The function's signature is the parameter list (names, types, defaults — written
once); the decorator adds what a signature cannot say: one-line help per parameter, allowed
choices, which parameters name data files or earlier runs, what the run writes and the paper.
From a `Declaration`:

- `headlab score <name>` / `headlab intervene <name>` / `headlab evaluate <name>` (`headlab.cli`),
- `headlab.jobs.run(name, model, ...)` (the job runner),
- the steps of a study file (`headlab.study`),
- the app's "New run" form,

are generated; nothing lists analyses by hand. The core finds them through the entry-point group
`headlab.analyses` (headlab's own: the `headlab.analyses` package, whose import registers every
module in it), so `headlab/` never imports an analysis; another package adds analyses by
declaring its module in that group.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from headlab.errors import HeadlabError

Kind = Literal["score", "intervene", "evaluate"]
ENTRY_POINT_GROUP = "headlab.analyses"
COMMON = ("model", "out", "run_id", "progress")
"""Parameters every job takes that are not the analysis's own (the model, the runs directory,
the run's name, the progress bars)."""


class ParamError(HeadlabError):
    """A parameter value of the wrong type, out of its choices or unknown. `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.detail = key, message


@dataclass(frozen=True)
class Param:
    """One parameter of an analysis, read off its job's signature.

    `type` is the annotation with None stripped (int, float, str, bool, list[int], ...);
    `optional` says None is allowed; `required` that there is no default; `role` is "file" /
    "folder" for paths of data (checked to exist, hashed in a study's manifest), "run" for the
    directory of an earlier run (a study may name the step instead), "" otherwise."""

    name: str
    type: Any
    default: Any
    help: str = ""
    optional: bool = False
    required: bool = False
    choices: tuple[Any, ...] | None = None
    role: str = ""
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) is list

    @property
    def item_type(self) -> Any:
        return typing.get_args(self.type)[0] if self.is_list else self.type

    def describe(self) -> str:
        """The type in words, for error messages and forms ("a list of integers", "a number")."""
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        text = f"a list of {plural[self.item_type]}" if self.is_list else words[self.type]
        if self.choices:
            text += " (one of " + ", ".join(map(str, self.choices)) + ")"
        return text + (" (or omitted)" if self.optional else "")

    def check(self, value: Any) -> Any:
        """`value` converted to this parameter's type (an int for a float parameter, a tuple for a
        list) or ParamError naming the parameter and the expected type."""
        if value is None:
            if self.optional:
                return None
            raise ParamError(self.name, f"needs a value ({self.describe()})")
        if self.is_list:
            if not isinstance(value, (list, tuple)):
                raise ParamError(self.name, f"expected {self.describe()}, got {value!r}")
            items = [self._scalar(v, self.item_type) for v in value]
            if any(i is _BAD for i in items):
                raise ParamError(self.name, f"expected {self.describe()}, got {value!r}")
            return list(items)
        out = self._scalar(value, self.type)
        if out is _BAD:
            raise ParamError(self.name, f"expected {self.describe()}, got {value!r}")
        if self.choices is not None and out not in self.choices:
            raise ParamError(self.name, f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return out

    @staticmethod
    def _scalar(value: Any, kind: Any) -> Any:
        if kind is bool:
            return value if isinstance(value, bool) else _BAD
        if isinstance(value, bool):
            return _BAD
        if kind is int:
            return value if isinstance(value, int) else _BAD
        if kind is float:
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else _BAD
        if kind is str:
            return value if isinstance(value, str) else _BAD
        return _BAD


_BAD = object()


@dataclass(frozen=True)
class Declaration:
    """An analysis (or intervention, or evaluation) as the surfaces see it.

    `run(model, out, run_id, *, progress, **params) -> Path` writes one run directory and returns
    it. `writes` names the scores / tables / JSON its run holds; `datasets` says what data it
    accepts; `paper` cites the method (METHODS.md has the definition)."""

    name: str
    kind: Kind
    summary: str
    params: tuple[Param, ...]
    run: Callable[..., Path]
    paper: str = ""
    datasets: str = ""
    writes: tuple[str, ...] = ()
    modality: Literal["text", "vision-language", "any"] = "any"
    table: Callable[[dict], list[dict]] | None = None
    """Rows of the paper's main table from a run's summary (a study report's table); None: the
    run's before / after / random-heads rows (`headlab.report.before_after`)."""

    @property
    def command(self) -> str:
        """The CLI name: `headlab <kind> <command>`."""
        return self.name.replace("_", "-")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ParamError(name, f"{self.name} has no parameter {name!r}; its parameters are "
                               f"{', '.join(p.name for p in self.params) or 'none'}")

    def check(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every parameter's value, converted and checked: unknown names, wrong types, a missing
        required value and a value outside its choices raise ParamError naming the parameter."""
        checked = {}
        for name, value in values.items():
            checked[name] = self.param(name).check(value)
        for p in self.params:
            if p.required and p.name not in checked:
                raise ParamError(p.name, f"{self.name} needs it ({p.describe()}): {p.help}")
        return checked


_REGISTRY: dict[str, Declaration] = {}
_DISCOVERED = False


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def analysis(name: str, kind: Kind, *, summary: str, paper: str = "", datasets: str = "",
             writes: tuple[str, ...] = (), help: dict[str, str] | None = None,
             choices: dict[str, tuple[Any, ...]] | None = None, files: tuple[str, ...] = (),
             folders: tuple[str, ...] = (), runs: tuple[str, ...] = (), flags: dict[str, str] | None = None,
             modality: Literal["text", "vision-language", "any"] = "any",
             table: Callable[[dict], list[dict]] | None = None) -> Callable[[Callable[..., Path]], Callable[..., Path]]:
    """Declare the decorated job as analysis `name`. Its keyword-only parameters (after
    `model, out, run_id`) are the analysis's parameters; `help`, `choices`, `flags` (a CLI flag
    other than --the-name) and the roles `files` / `folders` / `runs` annotate them by name."""
    help, choices, flags = help or {}, choices or {}, flags or {}

    def register(fn: Callable[..., Path]) -> Callable[..., Path]:
        hints = typing.get_type_hints(fn)
        params = []
        for p in inspect.signature(fn).parameters.values():
            if p.name in COMMON:
                continue
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{fn.__qualname__}: parameter {p.name} must be keyword-only (after *)")
            kind_, optional = _strip_none(hints[p.name])
            role = "file" if p.name in files else "folder" if p.name in folders else "run" if p.name in runs else ""
            params.append(Param(p.name, kind_, None if p.default is inspect.Parameter.empty else p.default,
                                help=help.get(p.name, ""), optional=optional,
                                required=p.default is inspect.Parameter.empty, choices=choices.get(p.name),
                                role=role, flag=flags.get(p.name)))
        # help may be a shared superset (COMMON_HELP); the other annotations must name parameters
        unknown = (set(choices) | set(flags) | set(files) | set(folders) | set(runs)) - {p.name for p in params}
        if unknown:
            raise TypeError(f"{fn.__qualname__}: declared {sorted(unknown)}, which are not its parameters")
        for p in params:  # every type must be one the surfaces can read and check
            if p.item_type not in (int, float, str, bool):
                raise TypeError(f"{fn.__qualname__}: parameter {p.name} has type {p.type!r}; use int, float, str, "
                                "bool or a list of one of them")
        decl = Declaration(name=name, kind=kind, summary=summary, params=tuple(params), run=fn, paper=paper,
                           datasets=datasets, writes=tuple(writes), modality=modality, table=table)
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise HeadlabError(f"two analyses declare the name {name!r} ({_REGISTRY[name].run.__module__} and "
                               f"{fn.__module__}); rename one")
        _REGISTRY[name] = decl
        fn.declaration = decl  # type: ignore[attr-defined]
        return fn

    return register


def discover() -> None:
    """Import every module of the entry-point group `headlab.analyses` once (each registers its
    declarations on import). A missing group means an installation without metadata."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    from importlib import import_module
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if not found:
        raise HeadlabError("no analyses are registered: headlab's package metadata is missing (it lists them under the "
                           f"entry-point group {ENTRY_POINT_GROUP!r}); install headlab with pip (pip install -e .)")
    for ep in found:
        import_module(ep.value.split(":")[0])
    _DISCOVERED = True


def declarations(kind: Kind | None = None) -> list[Declaration]:
    """Every declared analysis (of `kind`), by name."""
    discover()
    return sorted((d for d in _REGISTRY.values() if kind is None or d.kind == kind), key=lambda d: d.name)


def get(name: str) -> Declaration:
    """The declaration called `name` (or its CLI spelling, select-copy for select_copy)."""
    discover()
    key = name.replace("-", "_")
    if key not in _REGISTRY:
        import difflib

        near = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ParamError("analysis", f"unknown analysis {name!r}{hint}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


__all__ = ["Declaration", "Param", "ParamError", "analysis", "declarations", "discover", "get"]
