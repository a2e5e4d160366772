"""The pass base class, the pass registry and pipeline strings (DESIGN.md §4).

A pass is a frozen dataclass whose fields are its typed options, settable from a pipeline string:
`canonicalize,cse,lowrank{energy=0.98},quantize{weights=int8}`. Pass modules live in `passes/`
(installed as `lmc.passes`) and register themselves with `@register_pass`.
"""
from __future__ import annotations

import abc
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from lmc.errors import PipelineError
from lmc.ir.core import Module

PASSES: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Pass(abc.ABC):
    """Transforms a module in place. `run` may return a report (a dict) for the dump index."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def run(self, module: Module) -> dict[str, Any] | None:
        """Rewrite `module` in place; optionally return a report for the dump index."""

    def spec(self) -> str:
        """This pass as pipeline text, with the options that differ from their defaults."""
        opts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _fmt(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in PASSES:
        raise ValueError(f"pass {cls.__name__} has no name or a duplicate one: {cls.name!r}")
    PASSES[cls.name] = cls
    return cls


def _load_passes() -> None:
    import lmc.passes  # noqa: F401  (importing the package registers every pass)


def parse_pipeline(text: str) -> list[Pass]:
    """`"canonicalize,cse,foo{a=1,b=x}"` → pass instances, options converted to field types."""
    _load_passes()
    out = []
    for m in re.finditer(r"\s*([A-Za-z0-9_\-]+)\s*(\{[^}]*\})?\s*(,|$)", text):
        if not m.group(0).strip():
            continue
        name, opts = m.group(1), m.group(2)
        cls = PASSES.get(name)
        if cls is None:
            raise PipelineError(f"unknown pass '{name}' in pipeline '{text}'; known passes: "
                                f"{', '.join(sorted(PASSES))}")
        out.append(cls(**_parse_options(cls, opts[1:-1] if opts else "")))
    consumed = "".join(m.group(0) for m in re.finditer(
        r"\s*([A-Za-z0-9_\-]+)\s*(\{[^}]*\})?\s*(,|$)", text))
    if consumed.replace(" ", "") != text.replace(" ", ""):
        raise PipelineError(f"malformed pipeline '{text}': expected 'pass,pass{{opt=value}},...'")
    return out


def _parse_options(cls: type[Pass], text: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise PipelineError(f"pass '{cls.name}' has no option '{key}'; its options: "
                                f"{', '.join(fields) or 'none'}")
        out[key] = _convert(cls.name, key, raw.strip(), fields[key].type)
    return out


def _convert(pass_name: str, key: str, raw: str, typ) -> Any:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
        return raw
    except ValueError:
        raise PipelineError(f"option {pass_name}{{{key}}} expects {typ}, got '{raw}'") from None
