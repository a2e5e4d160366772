"""`lmc.compile`: a model (torch module, lmc Module, or .lmc file) → a callable compiled model."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lmc.errors import InputError, LmcError
from lmc.ir.core import Module
from lmc.ir.printer import print_module
from lmc.ir.types import DType, TensorType, eval_dim
from lmc.options import TARGETS, CompileOptions, default_pipeline
from lmc.pass_base import parse_pipeline
from lmc.pass_manager import PassManager


def compile(model, example_inputs=None, *, target: str | None = None,
            pipeline: str | None = None,
            dynamic_shapes=None, dump_ir: str | None = None, check_numerics: bool = False,
            options: CompileOptions | None = None) -> CompiledModel:
    """Compile `model` for `target`. Returns a callable; see README § Quickstart."""
    if options is not None and not isinstance(options, CompileOptions):
        raise LmcError(f"options must be an lmc.CompileOptions, got {type(options).__name__}")
    opts = replace(options or CompileOptions(), target=target or (options and options.target)
                   or "ref",
                   pipeline=pipeline if pipeline is not None else (options and options.pipeline),
                   dump_ir=dump_ir or (options and options.dump_ir) or os.environ.get(
                       "LMC_DUMP_IR") or None,
                   check_numerics=check_numerics or bool(options and options.check_numerics))
    if opts.target not in TARGETS:
        raise LmcError(f"target '{opts.target}' is not available; available: "
                       f"{', '.join(TARGETS)} (gpu arrives with its backend)")
    from lmc.cache import open_cache  # the cache dir is resolved here, never deeper
    cache = open_cache(opts, os.environ.get("LMC_CACHE_DIR"))
    prefetch(opts)
    module, import_text, shared = _import(model, example_inputs, dynamic_shapes,
                                          memo=cache is not None)
    loose = unbound_symbols(module.main)
    if loose:
        raise LmcError(f"input dims use symbol(s) {sorted(loose)} that no input has as a plain "
                       "dim, so no call could bind them; derived dims (like 2*T) are supported "
                       "only when T itself is the size of some input dim")
    artifacts = {"import": import_text or print_module(module)}
    pipeline_text = opts.pipeline if opts.pipeline is not None else ",".join(
        default_pipeline(opts))
    passes = parse_pipeline(pipeline_text)
    cache_key = cache.key(module, opts, pipeline_text, artifacts["import"]) if cache else ""
    hit = cache.load(cache_key, module, opts, artifacts["import"]) if cache else None
    if hit is not None:
        return hit
    imported_params = dict(module.params)  # passes replace arrays, never mutate them
    if shared:  # the passes rewrite their own copy
        module = module.clone()
    samples = None
    if opts.check_numerics:
        if example_inputs is None:
            raise LmcError("check_numerics=True needs example_inputs to run the passes on")
        samples = [_to_numpy(x) for x in _as_tuple(example_inputs)]
    pm = PassManager(passes, dump_ir=opts.dump_ir, check_numerics=opts.check_numerics,
                     sample_inputs=samples, rtol=opts.numerics_rtol, atol=opts.numerics_atol,
                     verify_each=opts.verify_each)
    pm.run(module)
    artifacts["optimized"] = print_module(module)
    compiled = CompiledModel(module, artifacts, opts, pm)
    if cache is not None:
        cache.store(cache_key, compiled, imported_params)
    return compiled


def prefetch(options: CompileOptions) -> None:
    """Let the target start on model-independent kernels while the model is imported (after
    the kernel cache dir is set, so that what it compiles is cached like the rest)."""
    if options.target == "cpu":
        from lmc.backends.cpu.kernels import prefetch as prefetch_cpu
        prefetch_cpu()


def build_executable(module: Module, options: CompileOptions):
    """The target's runner for an optimized module (None: the reference interpreter)."""
    if options.target == "cpu":
        from lmc.backends.cpu.runtime import CpuExecutable
        return CpuExecutable(module, threads=options.threads)
    return None


def _import(model, example_inputs, dynamic_shapes,
            memo: bool = False) -> tuple[Module, str | None, bool]:
    """(the model as an lmc Module, its text if known, whether the module is shared: the
    caller's own, or the import memo's, to be cloned before rewriting, so that a cache hit
    copies nothing). `memo`: a torch module compiled before in this process, unchanged
    (frontends/torch/memo.py), is not exported again."""
    if isinstance(model, Module):
        return model, None, True
    if isinstance(model, (str, Path)):
        from lmc.ir.parser import parse_file
        return parse_file(model), None, False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the torch frontend only
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise LmcError("compiling a torch.nn.Module needs example_inputs (a tuple of "
                           "tensors) for torch.export")
        from lmc.frontends.torch import import_module
        from lmc.frontends.torch import memo as import_memo
        inputs = _unalias(_as_tuple(example_inputs))
        if not memo:
            return import_module(model, inputs, dynamic_shapes), None, False
        key = import_memo.guard(model, inputs, dynamic_shapes)
        found = import_memo.imported(model, key)
        if found is not None:
            return *found, True
        module = import_module(model, inputs, dynamic_shapes)
        return module, import_memo.remember(model, key, module), False
    raise LmcError(f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an "
                   "lmc.ir.Module, or the path of a .lmc file")


def _unalias(inputs: tuple) -> tuple:
    """Copies of inputs that share storage with an earlier one: torch.export would merge them
    into one graph input, and the compiled model would then read one argument for both."""
    seen: set[int] = set()
    out = []
    for x in inputs:
        ptr = x.untyped_storage().data_ptr() if hasattr(x, "untyped_storage") else None
        if ptr is not None and ptr in seen:
            x = x.clone()
        elif ptr is not None:
            seen.add(ptr)
        out.append(x)
    return tuple(out)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _to_numpy(x) -> np.ndarray:
    from lmc.interop import to_numpy
    return to_numpy(x)


class CompiledModel:
    """A compiled model: call it with torch tensors (→ torch) or numpy arrays (→ numpy)."""

    def __init__(self, module: Module, artifacts: dict[str, str], options: CompileOptions,
                 pass_manager: PassManager | None = None, executable=None):
        self.module = module
        self.artifacts = artifacts
        self.options = options
        self.pass_records = pass_manager.records if pass_manager else []
        self.func = module.main
        self.cache_hit = False  # True when lmc.compile served this from its compile cache
        # `executable`: one built by lmc.load (object code registered with its engine first)
        self.executable = executable if executable is not None else build_executable(
            module, options)
        if self.executable is not None:
            self.artifacts.update(self.executable.artifacts())

    def save(self, path: str | Path) -> Path:
        """Write this model as one artifact file (`lmc.load(path)` reads it back)."""
        from lmc.artifact import save
        return save(self, path)

    @property
    def signature(self) -> list[tuple[str, TensorType]]:
        return [(a.name, a.type) for a in self.func.inputs]

    def __call__(self, *inputs) -> Any:
        arrays, is_torch = self._check_inputs(inputs)
        if self.executable is not None:
            outs = self.executable(arrays)
        else:
            from lmc.backends.reference import run_func
            outs = run_func(self.module, arrays, self.func)
        return self._pack(outs, is_torch)

    def profile(self, *inputs, repeat: int = 10):
        """Call the model `repeat` times on `inputs`, timing each step of its function: an
        `lmc.profile.Profile` (`print(cm.profile(x))` shows the slowest steps)."""
        if self.executable is None:
            raise LmcError("profile: the reference interpreter has no kernels to time; compile "
                           "for a native target (target='cpu')")
        arrays, _ = self._check_inputs(inputs)
        return self.executable.profile(arrays, repeat)[0]

    @property
    def report(self) -> dict[str, Any]:
        """What the target made of the model: kernels by kind, ops left to the interpreter."""
        return self.executable.report() if self.executable is not None else {}

    def _check_inputs(self, inputs) -> tuple[list[np.ndarray], bool]:
        arrays = check_inputs(self.func.inputs, inputs, "the model takes {n} input(s)")
        return arrays, any(hasattr(x, "detach") for x in inputs)

    def _made_for_this_call(self, o: np.ndarray) -> bool:
        """An output array made for this call alone, so torch may take it without a copy.
        Anything else is copied: a read-only view (a broadcast), a view of an input or of the
        arena, or a weight the model returns as is (np.array also keeps 0-d arrays 0-d)."""
        f = o.flags
        return f.owndata and f.c_contiguous and f.writeable and o.ndim > 0 and not any(
            o is w for w in self.module.params.values())

    def _pack(self, outs: list[np.ndarray], is_torch: bool):
        if is_torch:
            from lmc.interop import to_torch
            outs = [to_torch(o if self._made_for_this_call(o) else np.array(o, order="C"))
                    for o in outs]
        spec = self.module.meta.get("torch_out_spec")
        if is_torch and spec is not None and spec.num_leaves == len(outs):
            from torch.utils import _pytree  # same structure as the torch model returned
            return _pytree.tree_unflatten(outs, spec)
        return outs[0] if len(outs) == 1 else tuple(outs)


def check_inputs(formal, inputs, takes: str) -> list[np.ndarray]:
    """`inputs` (torch or numpy) as arrays, checked against the argument values `formal`;
    `takes` says what the callee takes ("the model takes {n} input(s)")."""
    if len(inputs) != len(formal):
        names = ", ".join(f"{a.name}: {a.type}" for a in formal)
        raise InputError(f"{takes.format(n=len(formal))} ({names}), got {len(inputs)}")
    arrays = [_to_numpy(x) for x in inputs]
    env: dict[str, int] = {}
    for i, (arg, arr) in enumerate(zip(formal, arrays)):
        check_input(i, arg.name, arg.type, arr, env)
    for i, (arg, arr) in enumerate(zip(formal, arrays)):  # now every plain symbol is bound
        check_derived_dims(i, arg.name, arg.type, arr, env)
    return arrays


def check_input(i: int, name: str, t: TensorType, arr: np.ndarray, env: dict[str, int]) -> None:
    """Raise InputError unless `arr` fits type `t`; binds plain symbols in `env` as it goes."""
    where = f"input {i} ('{name}')"
    # None, strings, objects: not a tensor at all (ml_dtypes' bfloat16 is of kind "V")
    if arr.dtype.kind not in "biuf" and arr.dtype.name != "bfloat16":
        raise InputError(f"{where}: expected a tensor or array of type {t}, got "
                         f"{'None' if arr.dtype.kind == 'O' and arr.ndim == 0 else arr.dtype}")
    if arr.ndim != t.rank:
        raise InputError(f"{where}: expected rank {t.rank} ({t}), got shape {list(arr.shape)}")
    try:
        got = DType.from_numpy(arr.dtype)
    except LmcError:
        got = None
    if got is not t.dtype:
        raise InputError(f"{where}: expected dtype {t.dtype.value} ({t}), got {arr.dtype}")
    for axis, (d, n) in enumerate(zip(t.shape, arr.shape)):
        if isinstance(d, int) and d != n:
            raise InputError(f"{where}: dim {axis} must be {d} ({t}), got {n}")
        if isinstance(d, str) and d.isidentifier() and env.setdefault(d, n) != n:
            raise InputError(f"{where}: dim {axis} is '{d}' = {env[d]} from an earlier "
                             f"input, but here it is {n}")


def check_derived_dims(i: int, name: str, t: TensorType, arr: np.ndarray,
                       env: dict[str, int]) -> None:
    """Dims like `2*T` must equal their value once every plain symbol is bound."""
    for axis, (d, n) in enumerate(zip(t.shape, arr.shape)):
        if isinstance(d, str) and not d.isidentifier() and eval_dim(d, env) != n:
            raise InputError(f"input {i} ('{name}'): dim {axis} must be {d} = "
                             f"{eval_dim(d, env)}, got {n}")


def unbound_symbols(func) -> set[str]:
    """Symbols of input dims that no input gives plainly (so no call could bind them)."""
    plain = {d for a in func.inputs for d in a.type.shape if isinstance(d, str) and
             d.isidentifier()}
    used = set().union(*(a.type.symbols() for a in func.inputs)) if func.inputs else set()
    return used - plain
