"""Runs a pipeline of passes: verifies after each, times each, and on request dumps the IR after
every pass (with a diff and an index) and checks numerics after every pass (DESIGN.md §4)."""
from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmc.errors import LmcError, NumericsError
from lmc.ir.core import Module
from lmc.ir.printer import print_module
from lmc.ir.verifier import verify
from lmc.pass_base import Pass, parse_pipeline


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    ops_before: int
    ops_after: int
    changed: dict[str, int]          # op name → count delta
    changed_lines: int
    report: dict[str, Any] | None = None
    dump: str | None = None


@dataclass
class PassManager:
    passes: Sequence[Pass]
    dump_ir: str | Path | None = None
    check_numerics: bool = False
    sample_inputs: list[np.ndarray] | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    verify_each: bool = True
    records: list[PassRecord] = field(default_factory=list)

    @staticmethod
    def from_pipeline(text: str, **kwargs) -> PassManager:
        return PassManager(parse_pipeline(text), **kwargs)

    def run(self, module: Module) -> Module:
        verify(module, pass_name="import")
        dump_dir = self._prepare_dump_dir()
        text = print_module(module)
        if dump_dir:
            self._write(dump_dir, "00-import.lmc", text)
        reference = self._numerics_reference(module)
        all_weights = dict(module.params)  # every stage's dump must load, so keep the union
        try:
            for i, p in enumerate(self.passes, start=1):
                text = self._step(i, p, module, text, dump_dir, reference)
                all_weights.update(module.params)
        finally:  # a failing pass still leaves a readable, reloadable dump behind
            if dump_dir:
                self._write(dump_dir, "index.md", self.index_markdown())
                _save_weights(dump_dir, all_weights)
        return module

    def _step(self, i: int, p: Pass, module: Module, text: str, dump_dir: Path | None,
              reference: list[np.ndarray] | None) -> str:
        """Run pass #i; dump its IR (before verifying, so broken IR can be read); check it."""
        before_counts = module.op_counts()
        start = time.perf_counter()
        report = _run_one(p, module)
        seconds = time.perf_counter() - start
        new_text = print_module(module)
        diff = list(difflib.unified_diff(text.splitlines(), new_text.splitlines(),
                                         f"{i - 1:02d}", f"{i:02d}-{p.name}", lineterm=""))
        rec = PassRecord(i, p.spec(), seconds, sum(before_counts.values()),
                         sum(module.op_counts().values()),
                         _count_delta(before_counts, module.op_counts()),
                         sum(1 for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---")),
                         report)
        if dump_dir:
            rec.dump = f"{i:02d}-{p.name}.lmc"
            self._write(dump_dir, rec.dump, new_text)
            self._write(dump_dir, f"{i:02d}-{p.name}.diff", "\n".join(diff) + "\n")
        self.records.append(rec)
        if self.verify_each:
            verify(module, pass_name=p.spec())
        if reference is not None:
            self._check(module, reference, p)
        return new_text

    # -- dumps ---------------------------------------------------------------------------------

    def _prepare_dump_dir(self) -> Path | None:
        if not self.dump_ir:
            return None
        d = Path(self.dump_ir)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LmcError(f"cannot create the IR dump folder {d}: {exc.strerror}") from None
        stale = [*d.glob("[0-9][0-9]-*.lmc"), *d.glob("[0-9][0-9]-*.diff"), d / "index.md",
                 d / "weights.safetensors"]
        for old in (f for f in stale if f.exists()):
            old.unlink()  # a dump directory shows one compile, never a mix of two
        return d

    @staticmethod
    def _write(d: Path, name: str, text: str) -> None:
        (d / name).write_text(text)

    def index_markdown(self) -> str:
        lines = ["# lmc IR dump", "", "| # | pass | time (ms) | ops before → after | changed "
                 "lines | op count changes | report |", "| --- | --- | --- | --- | --- | --- "
                 "| --- |"]
        for r in self.records:
            delta = ", ".join(f"{k} {v:+d}" for k, v in r.changed.items()) or "—"
            rep = ", ".join(f"{k}={v}" for k, v in (r.report or {}).items()
                            if not _is_line_list(v)) or "—"
            lines.append(f"| {r.index:02d} | `{r.name}` | {r.seconds * 1e3:.1f} | {r.ops_before}"
                         f" → {r.ops_after} | {r.changed_lines} | {delta} | {rep} |")
        for r in self.records:  # list-valued reports (e.g. fuse's declined fusions): a line each
            for key, items in (r.report or {}).items():
                if _is_line_list(items):
                    lines += ["", f"## {r.index:02d} `{r.name}`: {key}", ""]
                    lines += [f"- {item}" for item in items]
        total = sum(r.seconds for r in self.records)
        lines += ["", f"Total pass time: {total * 1e3:.1f} ms. Files: `00-import.lmc`, then "
                  "`NN-<pass>.lmc` and `NN-<pass>.diff` after each pass; every `.lmc` parses "
                  "back (`lmc opt FILE -p PIPELINE`), with weights in `weights.safetensors`.", ""]
        return "\n".join(lines)

    # -- numerics ------------------------------------------------------------------------------

    def _numerics_reference(self, module: Module) -> list[np.ndarray] | None:
        if not self.check_numerics:
            return None
        if self.sample_inputs is None:
            raise LmcError("check_numerics needs example inputs to run the interpreter on")
        from lmc.backends.reference import run_func
        return run_func(module, self.sample_inputs)

    def _check(self, module: Module, reference: list[np.ndarray], p: Pass) -> None:
        from lmc.backends.reference import run_func
        outs = run_func(module, self.sample_inputs)
        for i, (got, want) in enumerate(zip(outs, reference)):
            if got.shape != want.shape or not np.allclose(got, want, self.rtol, self.atol,
                                                          equal_nan=True):
                err = _max_error(got, want)
                raise NumericsError(
                    f"pass '{p.spec()}' changed output #{i}: max abs error {err} exceeds "
                    f"rtol={self.rtol}, atol={self.atol} (it is the first pass whose outputs "
                    "drift from the imported module; read its diff in the IR dump, "
                    "dump_ir=DIR)", p.name)


def _is_line_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def _run_one(p: Pass, module: Module) -> dict[str, Any] | None:
    try:
        return p.run(module)
    except LmcError:
        raise
    except Exception as exc:  # a bug in a pass: name the pass, keep the cause chained
        raise LmcError(f"pass '{p.spec()}' failed with {type(exc).__name__}: {exc}") from exc


def _max_error(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"(shape {list(got.shape)} instead of {list(want.shape)})"
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return f"{np.nanmax(d):.3g}" if d.size else "0"


def _count_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    names = sorted(set(before) | set(after))
    return {n: after.get(n, 0) - before.get(n, 0) for n in names
            if after.get(n, 0) != before.get(n, 0)}


def _save_weights(d: Path, weights: dict[str, np.ndarray]) -> None:
    if not weights:
        return
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
              str(d / "weights.safetensors"))


__all__ = ["PassManager", "PassRecord"]
