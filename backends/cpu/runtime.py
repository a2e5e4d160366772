"""The CPU runtime: runs a fused module as a list of steps (docs/CPU_BACKEND.md).

View ops become numpy views (no copy), `kernel.fused` ops run native kernels that read their
operands through strides, a few data-movement ops have native kernels, and any other op runs the
reference interpreter's numpy implementation (listed in `fallback`, so a user can see it). Kernel
outputs live in the memory plan's arena; function results are fresh arrays.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lmc.backends.reference.interpreter import IMPL, bind_symbols
from lmc.errors import LmcError
from lmc.ir.analysis import VIEWS
from lmc.ir.core import Func, Module, Op, Value
from lmc.ir.types import eval_shape, normalize_axis

from .jit import COMPILE_WORKERS, HostTarget, default_engine
from .kernels import ConcatLauncher, build_kernel, native_op
from .memory import Buffer, MemoryPlan, Placement

CONSTANTS = frozenset(["tensor.constant", "tensor.iota"])
# The views a concat operand may reach its kernel's result through and still be placed.
PLACEABLE_VIEWS = frozenset(["tensor.reshape", "tensor.permute"])


def run_view(op: Op, env: dict[str, int], x: np.ndarray) -> np.ndarray:
    """A view op on a numpy array: numpy copies only a reshape its strides cannot express."""
    if op.name == "tensor.permute":
        return np.transpose(x, op.perm)
    return IMPL[op.name](op, env, x)


def run_constant(op: Op, env: dict[str, int]) -> np.ndarray:
    """A constant as a read-only view of its value, broadcast to its shape (stride 0 for a
    splat): a zeros[V, d] that a backward graph accumulates into costs no memory traffic, and
    every kernel reads strides."""
    t = op.result.type
    return np.broadcast_to(np.asarray(op.value, t.dtype.to_numpy()), eval_shape(t.shape, env))


@dataclass
class Step:
    """One op of the function: operand slots → result slots, and how to run it. Kernel steps
    write into preallocated outputs (`planned`); the others return fresh arrays."""

    op: Op
    args: list[int]
    outs: list[int]
    fn: Callable
    kind: str  # "view", "kernel", "native", "constant" or "fallback"

    @property
    def planned(self) -> bool:
        return self.kind == "kernel" or getattr(self.fn, "planned", False)


class CpuExecutable:
    """A fused module compiled for the CPU: call it with numpy arrays, get numpy arrays."""

    def __init__(self, module: Module, target: HostTarget | None = None,
                 threads: int | None = None, prepack: bool = True):
        # prepack: weights are fixed for the executable's life, so kernels may prepare them
        # once (GEMM panels); a trainer that updates weights in place passes False.
        self.module, self.target, self.threads = module, target, threads
        self.prepack = prepack
        self.func: Func = module.main
        self._slots: dict[Value, int] = {}
        for v in self.func.body.args:
            self._slot(v)
        ops = [op for op in self.func.body.ops if op.name != "func.return"]
        kernels = _build_kernels([op for op in ops if op.name == "kernel.fused"], target, threads)
        self.steps = [self._build(op, kernels) for op in ops]
        self.folded: dict[int, np.ndarray] = {}  # slot → a weight-only value computed once
        self.folded_steps: list[Step] = []  # ... and the steps that computed them
        if prepack:
            self._fold_weights()
        self.output_slots = [self._slots[v] for v in self.func.outputs]
        buffers = self._buffers()
        self.plan = MemoryPlan(buffers, sorted(self._input_symbols()), self._placements(buffers))
        self._last_use = self._last_uses()
        self._arena_views = self._views_of_arena()
        self._lock = threading.Lock()  # the arena is per executable: one call at a time

    # -- building -----------------------------------------------------------------------------

    def _slot(self, v: Value) -> int:
        return self._slots.setdefault(v, len(self._slots))

    def _build(self, op: Op, kernels: dict[Op, Callable | None]) -> Step:
        args = [self._slots[v] for v in op.operand_values]
        outs = [self._slot(v) for v in op.result_values]
        if op.name in VIEWS:
            return Step(op, args, outs, run_view, "view")
        if op.name == "kernel.fused":
            fn = kernels[op]
            if fn is not None:
                return Step(op, args, outs, fn, "kernel")
        if op.name in CONSTANTS:  # data from attributes and sizes only: numpy makes it
            fn = run_constant if op.name == "tensor.constant" else IMPL[op.name]
            return Step(op, args, outs, fn, "constant")
        if op.name == "tensor.concat":
            return Step(op, args, outs, ConcatLauncher(op), "native")
        native = native_op(op, self.threads)
        if native is not None:
            return Step(op, args, outs, native, "native")
        if op.name not in IMPL:
            raise LmcError(f"the cpu backend cannot run {op.name} (at {op.loc}): no kernel and "
                           "no interpreter implementation")
        return Step(op, args, outs, IMPL[op.name], "fallback")

    def _fold_weights(self) -> None:
        """Weights are fixed for this executable's life, so what is computed from weights alone
        is computed now, once, and its step dropped: static views of weights (a Linear's
        `permute(W)`) and weight-only kernels (a bf16 weight's cast to f32 for its GEMM, from
        `widen-lowp`). Kernels then prepare the constant operands they take (GEMM panels)."""
        kinds = dict(zip(self.func.body.args, self.func.arg_kinds))
        static = {self._slots[a]: self.module.params[a.name] for a in self.func.body.args
                  if kinds[a] in ("param", "buffer")}
        kept = []
        for st in self.steps:
            if st.kind in ("view", "kernel") and all(s in static for s in st.args) and \
                    all(v.type.is_static for v in st.op.result_values):
                for s, x in zip(st.outs, self._run_once(st, [static[s] for s in st.args])):
                    static[s] = self.folded[s] = x
                self.folded_steps.append(st)
            else:
                kept.append(st)
        self.steps = kept
        for st in self.steps:
            if st.kind == "kernel" and hasattr(st.fn, "prepack"):
                for i, s in enumerate(st.args):
                    if s in static:
                        st.fn.prepack(i, static[s])

    def _run_once(self, st: Step, ins: list[np.ndarray]) -> list[np.ndarray]:
        if st.kind == "view":
            return [run_view(st.op, {}, ins[0])]
        outs = [_fresh(v, {}) for v in st.op.result_values]
        try:
            st.fn(ins, outs, {})
        except LmcError:
            raise
        except Exception as exc:
            raise LmcError(f"{st.op.name} at {st.op.loc} failed on the cpu backend while "
                           f"computing it from the weights: {type(exc).__name__}: {exc}") from exc
        for x in outs:  # shared by every call: a result that is one is copied for the caller
            x.setflags(write=False)
        return outs

    def _input_symbols(self) -> set[str]:
        return {s for a in self.func.inputs for s in a.type.symbols()}

    def _buffers(self) -> list[Buffer]:
        """Planned outputs of kernel steps, with lifetimes extended through their views."""
        root = {}  # slot → the slot of the buffer it views
        for st in self.steps:
            if st.kind == "view":
                root[st.outs[0]] = root.get(st.args[0], st.args[0])
        returned = {root.get(s, s) for s in self.output_slots}
        known = self._input_symbols()
        start, end, types, perms = {}, {}, {}, {}
        for i, st in enumerate(self.steps):
            for s in st.args:
                end[root.get(s, s)] = i
            if st.planned:
                for s, v in zip(st.outs, st.op.result_values):
                    if v.type.symbols() <= known and s not in returned:
                        start[s], types[s] = i, v.type
                        if getattr(st.fn, "strided_out", False):
                            perms[s] = _read_permuted(v)
        return [Buffer(s, types[s], start[s], end.get(s, start[s]), perms.get(s))
                for s in start]

    def _placements(self, buffers: list[Buffer]) -> list[Placement]:
        """Concat operands that a kernel writing through strides computes, by way of reshapes
        and permutes only: each is placed in its slice of the concat's buffer."""
        planned = {b.slot for b in buffers}
        view_of = {st.outs[0]: st for st in self.steps if st.kind == "view"}
        writer = {s: st for st in self.steps if st.planned for s in st.outs}
        taken: set[int] = set()
        found = []
        for st in self.steps:
            if st.op.name != "tensor.concat" or st.outs[0] not in planned:
                continue
            axis = normalize_axis(st.op.axis, st.op.result.type.rank)
            widths = [v.type.shape[axis] for v in st.op.operand_values]
            for i, s in enumerate(st.args):
                views = []
                while s in view_of and view_of[s].op.name in PLACEABLE_VIEWS:
                    views.append(view_of[s].op)
                    s = view_of[s].args[0]
                if s in planned and s not in taken and \
                        getattr(getattr(writer.get(s), "fn", None), "strided_out", False):
                    taken.add(s)
                    found.append(Placement(s, st.outs[0], axis, tuple(widths[:i]), widths[i],
                                           tuple(reversed(views))))
        return found

    def _views_of_arena(self) -> set[int]:
        """Result slots of view steps of planned buffers (directly or through other such
        views): the same numpy view for every call with the same sizes, so each layout keeps
        it (a view step costs ~10 us of Python; a train step has ~170 of them)."""
        of_arena, found = set(self.plan.buffers), set()
        for st in self.steps:
            if st.kind == "view" and st.args[0] in of_arena:
                of_arena.add(st.outs[0])
                found.add(st.outs[0])
        return found

    def _last_uses(self) -> list[list[int]]:
        """Per step, the slots whose last reader it is (freed after it, unless returned)."""
        last: dict[int, int] = {}
        for i, st in enumerate(self.steps):
            for s in st.args:
                last[s] = i
        keep = set(self.output_slots)
        frees: list[list[int]] = [[] for _ in self.steps]
        for s, i in last.items():
            if s not in keep:
                frees[i].append(s)
        return frees

    # -- running ------------------------------------------------------------------------------

    def report(self) -> dict:
        kinds: dict[str, int] = {}
        for st in self.steps:
            key = st.op.kind if st.kind == "kernel" else st.kind
            kinds[key] = kinds.get(key, 0) + 1
        return {"steps": kinds, "fallback": [f"{st.op.name} at {st.op.loc}" for st in self.steps
                                             if st.kind == "fallback"],
                "folded": len(self.folded_steps)}

    def llvm_texts(self) -> list[str]:
        """The LLVM IR module texts of every kernel this executable runs (each once)."""
        return list(dict.fromkeys(t for st in self.steps for t in _llvm_texts(st.fn)))

    def kernel_modules(self) -> list:
        """The JIT modules (object code included) behind `llvm_texts()`, for artifacts."""
        engine = default_engine(self.target)
        return [engine.by_key[engine.key(t)] for t in self.llvm_texts()]

    def artifacts(self) -> dict[str, str]:
        """The LLVM IR of every kernel, as one readable listing (`cm.artifacts["llvm"]`)."""
        texts = self.llvm_texts()
        return {"llvm": "\n".join(texts)} if texts else {}

    def peak_bytes(self, inputs: list[np.ndarray]) -> dict[str, int]:
        """Arena bytes for these input sizes, and what the buffers would take without reuse."""
        layout = self.plan.layout(self._env(inputs))
        return {"arena_bytes": layout.nbytes, "without_reuse_bytes": layout.unshared_bytes}

    def _env(self, inputs: list[np.ndarray]) -> dict[str, int]:
        return bind_symbols([a.type for a in self.func.inputs], inputs)

    def __call__(self, inputs: list[np.ndarray],
                 into: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Run on `inputs`. `into`: per function result, an array the kernel computing it
        writes the result into (None, or one of another shape or dtype: a fresh array); the
        caller must not pass an array that is also an input (a trainer recycles the weights of
        the step before last, see lmc/training.py): a fresh result of megabytes costs its page
        faults on every call."""
        with self._lock:
            return self._run(inputs, into=into)

    def profile(self, inputs: list[np.ndarray], repeat: int = 10,
                into: list[np.ndarray | None] | None = None):
        """Run `repeat` calls timing every step: (an `lmc.profile.Profile`, the outputs of the
        last call). `into` as for a call."""
        from lmc.profile import profile_of
        seconds = [0.0] * len(self.steps)
        with self._lock:
            for _ in range(repeat):
                outs = self._run(inputs, seconds, into)
        return profile_of(self.steps, seconds, repeat, self._env(inputs)), outs

    def _run(self, inputs: list[np.ndarray], seconds: list[float] | None = None,
             into: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
        env = self._env(inputs)
        layout = self.plan.layout(env)
        given = self._given(into, env)
        vals: list[np.ndarray | None] = [None] * len(self._slots)
        it = iter(inputs)
        for a, kind in zip(self.func.body.args, self.func.arg_kinds):
            vals[self._slots[a]] = next(it) if kind == "input" else self.module.params[a.name]
        for s, x in self.folded.items():
            vals[s] = x
        for i, (st, frees) in enumerate(zip(self.steps, self._last_use)):
            if seconds is None:
                self._run_step(st, vals, env, layout, given)
            else:  # profiling: the step's wall time, its worker threads included
                t0 = time.perf_counter()
                self._run_step(st, vals, env, layout, given)
                seconds[i] += time.perf_counter() - t0
            for s in frees:
                vals[s] = None
        # A result that is (a view of) a constant is read-only: the caller gets its own copy.
        return [x if x.flags.writeable else x.copy()
                for x in (vals[s] for s in self.output_slots)]

    def _given(self, into: list[np.ndarray | None] | None, env: dict[str, int]
               ) -> dict[int, np.ndarray]:
        """Result slot → the caller's array to compute it in, where `into` has a usable one."""
        given: dict[int, np.ndarray] = {}
        for s, v, x in zip(self.output_slots, self.func.outputs, into or ()):
            if x is not None and s not in self.plan.buffers and x.flags.c_contiguous and \
                    x.flags.writeable and x.dtype == v.type.dtype.to_numpy() and \
                    x.shape == tuple(eval_shape(v.type.shape, env)):
                given.setdefault(s, x)
        return given

    def _run_step(self, st: Step, vals: list, env: dict[str, int], layout,
                  given: dict[int, np.ndarray] | None = None) -> None:
        ins = [vals[s] for s in st.args]
        try:
            if st.planned:
                outs = [layout.view(self.plan.buffers[s], env) if s in self.plan.buffers
                        else given[s] if given and s in given else _fresh(v, env)
                        for s, v in zip(st.outs, st.op.result_values)]
                st.fn(ins, outs, env)
            elif st.outs[0] in self._arena_views:
                outs = [layout.derived(st.outs[0], lambda: st.fn(st.op, env, *ins), ins[0])]
            else:
                result = st.fn(st.op, env, *ins)
                outs = list(result) if isinstance(result, tuple) else [result]
        except LmcError:
            raise
        except Exception as exc:  # a kernel launcher bug: name the op and where it came from
            raise LmcError(f"{st.op.name} at {st.op.loc} failed on the cpu backend: "
                           f"{type(exc).__name__}: {exc}") from exc
        for s, x in zip(st.outs, outs):
            vals[s] = x


def _read_permuted(v: Value) -> tuple[int, ...] | None:
    """The perm of the one `tensor.permute` (keeping the last axis) that every use of `v`
    is, or None: storing v in that order makes the permuted view contiguous."""
    perms = {tuple(u.perm) if u.name == "tensor.permute" else None for u in v.users}
    perm = perms.pop() if len(perms) == 1 else None
    if perm is None or perm[-1] != len(perm) - 1 or perm == tuple(range(len(perm))):
        return None
    return perm


def _build_kernels(ops: list[Op], target, threads) -> dict[Op, Callable | None]:
    """Each kernel op's callable (`build_kernel`), built on COMPILE_WORKERS threads: llvmlite
    compiles one module at a time in a process, and the engine's helper processes
    (`jit.JitEngine._codegen`, started by `kernels.prefetch`) compile side by side, so a cold
    build takes about half as long on 2 cores. Without helpers (an artifact's load) the
    threads only overlap loading objects."""
    if len(ops) < 2:
        return {op: _build_kernel(op, target, threads) for op in ops}
    # Attention modules first: each takes several times as long as any other kernel's.
    order = sorted(ops, key=lambda op: op.kind != "attention")
    with ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="lmc-build") as workers:
        return dict(zip(order, workers.map(lambda op: _build_kernel(op, target, threads), order)))


def _build_kernel(op: Op, target, threads) -> Callable | None:
    try:
        return build_kernel(op, target, threads)
    except LmcError:
        raise
    except Exception as exc:  # a generator bug: name the kernel and where it came from
        raise LmcError(f"the cpu backend could not build the {op.kind} kernel at {op.loc}: "
                       f"{type(exc).__name__}: {exc}") from exc


def _llvm_texts(fn) -> list[str]:
    """The LLVM IR modules behind a step's callable (launchers expose `llvm_modules()`)."""
    get = getattr(fn, "llvm_modules", None)
    return list(get()) if get is not None else []


def _fresh(v: Value, env: dict[str, int]) -> np.ndarray:
    return np.empty(eval_shape(v.type.shape, env), v.type.dtype.to_numpy())
