"""raise-moe: turn an unrolled per-expert MoE loop into the moe dialect (route → gather →
grouped_matmul → combine), so the IR has no data-dependent sizes and says that each expert
computes only the rows routed to it.

torch.export unrolls `for e in range(E): tok, slot = where(topi == e); ...; out.index_add_(...)`
into E branches. With the torch frontend's spelling, branch e is

    %nz   = tensor.nonzero (tensor.eq %topi, (tensor.constant {value = e}))      : i64[u,2]
    %tok  = tensor.reshape (tensor.slice %nz {axis = 1, start = 0, end = 1})   : i64[u]
    %slot = tensor.reshape (tensor.slice %nz {axis = 1, start = 1, end = 2})   : i64[u]
    %xe   = tensor.take %x, %tok {axis = 0}                                      : f32[u,d]
    %y    = <elementwise ops and matmuls against expert weights, rows kept>      : f32[u,d]
    %we   = tensor.reshape (tensor.take (tensor.reshape %topw : [N*k]),
                                        (tok * k + slot) {axis = 0})             : f32[u,1]
    %acc' = tensor.index_add %acc, %tok, (tensor.mul %y, %we) {axis = 0}

where an expert weight is `select(W, 0, e)` (slice + reshape, optionally transposed by a permute)
or a separate per-expert parameter (stacked here into one [E, ...] parameter). The accumulator
chain starts from `tensor.constant 0` (or any value, which is then added to the result).

The pass matches each branch, checks that all branches compute the same function of (x, their
expert's weights) and that the expert indices are exactly 0..E-1, and emits one copy of the body
on the routed rows. Anything it does not recognise leaves the IR unchanged, with the reason in
the report: a wrong rewrite would be silent, a skipped one only slow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmc.errors import LmcError
from lmc.ir.core import Block, Func, Module, Op, Value
from lmc.ir.ops.tensor import Binary, Cast, Unary, Where
from lmc.ir.rewriter import Rewriter, splat_value
from lmc.ir.types import TensorType, dims_equal
from lmc.pass_base import Pass, register_pass
from lmc.passes.dce import prune_params


class _Skip(Exception):
    """The structure does not match exactly; the message says why (it goes into the report)."""


def _op(v: Value, name: str) -> Op | None:
    """The op defining `v` if it is a `name`, else None."""
    op = v.op
    return op if op is not None and op.name == name else None


def _int_splat(v: Value) -> int | None:
    if _op(v, "tensor.constant") is None or not v.dtype.is_int:
        return None
    s = splat_value(v)
    return int(s) if s is not None else None


# ---- the frontend's spelling of where / index / select ------------------------------------

def _nz_column(v: Value) -> tuple[Op, int] | None:
    """`where(cond)[c]`: (the nonzero op, c) for reshape(slice(nz, axis 1, c, c+1)) to [u]."""
    r = _op(v, "tensor.reshape")
    s = _op(r.x, "tensor.slice") if r is not None else None
    nz = _op(s.x, "tensor.nonzero") if s is not None else None
    if nz is None or v.type.rank != 1 or s.axis not in (1, -1) or s.step != 1:
        return None
    if not isinstance(s.start, int) or s.end != s.start + 1:
        return None
    return nz, s.start


def _expert_index(nz: Op) -> tuple[Value, int]:
    """(topi, e) for nonzero(eq(topi, e)), either operand order."""
    eq = _op(nz.x, "tensor.eq")
    if eq is None:
        raise _Skip(f"tensor.nonzero at {nz.loc} is not of an equality test")
    for t, c in ((eq.lhs, eq.rhs), (eq.rhs, eq.lhs)):
        e = _int_splat(c)
        if e is not None and t.type.rank == 2 and t.dtype.is_int and eq.result.shape == t.shape:
            return t, e
    raise _Skip(f"tensor.eq at {eq.loc} does not compare [N,k] indices with a scalar")


def _flat_slot(v: Value, nz: Op, k: int) -> bool:
    """Whether `v` is tok * k + slot, the flat index of (tok, slot) into topw.reshape(-1)."""
    add = _op(v, "tensor.add")
    if add is None:
        return False
    for a, b in ((add.lhs, add.rhs), (add.rhs, add.lhs)):
        if _nz_column(b) != (nz, 1):
            continue
        if k == 1 and _nz_column(a) == (nz, 0):
            return True  # tok * 1 may have been folded away
        mul = _op(a, "tensor.mul")
        if mul is not None and any(_nz_column(p) == (nz, 0) and _int_splat(q) == k
                                   for p, q in ((mul.lhs, mul.rhs), (mul.rhs, mul.lhs))):
            return True
    return False


def _route_weight(v: Value, nz: Op) -> Value | None:
    """topw for `topw[tok, slot].unsqueeze(-1)`, spelled reshape(take(reshape(topw), flat))."""
    r = _op(v, "tensor.reshape")
    take = _op(r.x, "tensor.take") if r is not None else None
    flat = _op(take.x, "tensor.reshape") if take is not None else None
    if flat is None or take.axis != 0 or v.type.rank != 2 or v.type.shape[1] != 1:
        return None
    topw = flat.x
    if topw.type.rank != 2 or not isinstance(topw.type.shape[1], int):
        return None
    return topw if _flat_slot(take.indices, nz, topw.type.shape[1]) else None


@dataclass(frozen=True)
class _Weight:
    """One expert-weight operand of a branch: `select(source, 0, e)` when `stacked`, else the
    per-expert parameter `source` itself; `transposed` when the branch uses its transpose."""

    source: Value
    stacked: bool
    transposed: bool
    leaf: Value  # the value the branch uses


def _expert_weight(v: Value, e: int, func: Func) -> _Weight | None:
    p = _op(v, "tensor.permute")
    transposed = p is not None and tuple(p.perm) == (1, 0)
    inner = p.x if transposed else v
    r = _op(inner, "tensor.reshape")
    s = _op(r.x, "tensor.slice") if r is not None else None
    if s is not None and s.axis == 0 and s.step == 1 and \
            r.result.type.shape == s.x.type.shape[1:]:
        if (s.start, s.end) != (e, e + 1):
            raise _Skip(f"expert {e} reads expert {s.start}'s weight at {s.loc}")
        return _Weight(s.x, True, transposed, v)
    if inner.op is None and inner in func.body.args and \
            func.arg_kinds[func.body.args.index(inner)] == "param" and inner.type.rank <= 2:
        return _Weight(inner, False, transposed, v)
    return None


# ---- one branch ----------------------------------------------------------------------------

ELEMENTWISE = (Unary, Binary, Cast, Where)


@dataclass
class _Branch:
    """What one unrolled expert iteration reads and computes."""

    expert: int
    index_add: Op
    nz: Op
    topi: Value
    topw: Value
    y: Value  # the expert's output rows [u, d]
    rows: set[Value] = field(default_factory=set)  # values that depend on this branch's rows
    x_take: Op | None = None  # the gather of this expert's rows of x
    key: Any = None  # the body's structure, expert weights abstracted
    weights: list[_Weight] = field(default_factory=list)  # in the order the key visits them


def _match_branch(ia: Op, func: Func) -> _Branch:
    col = _nz_column(ia.indices)
    if ia.axis != 0 or col is None or col[1] != 0:
        raise _Skip(f"tensor.index_add at {ia.loc} is not indexed by where(topi == e)[0]")
    nz = col[0]
    topi, e = _expert_index(nz)
    mul = _op(ia.src, "tensor.mul")
    if mul is None:
        raise _Skip(f"index_add source at {ia.loc} is not an expert output times its weight")
    for y, w in ((mul.lhs, mul.rhs), (mul.rhs, mul.lhs)):  # noqa: B007  (y used below)
        topw = _route_weight(w, nz)
        if topw is not None:
            break
    else:
        raise _Skip(f"no topw[tok, slot] factor in the index_add source at {ia.loc}")
    if topw.type.shape != topi.type.shape:
        raise _Skip(f"routing weights {topw.type} and indices {topi.type} differ in shape")
    b = _Branch(e, ia, nz, topi, topw, y, rows=_forward_closure(nz.result))
    if y not in b.rows:
        raise _Skip(f"expert {e}'s output at {ia.loc} does not depend on its routed rows")
    b.key = _Tracer(b, func).key(y)
    return b


def _forward_closure(v: Value) -> set[Value]:
    """Every value computed from `v` up to the accumulating index_adds (iteratively: models can
    be deep; stopping there keeps the rest of the model, downstream of the MoE, out)."""
    seen, todo = {v}, [v]
    while todo:
        for user in todo.pop().users:
            if user.name == "tensor.index_add":
                continue
            for r in user.result_values:
                if r not in seen:
                    seen.add(r)
                    todo.append(r)
    return seen


class _Tracer:
    """Computes a branch body's structural key: equal keys mean equal functions of (x, the
    expert's weights). Leaves are not memoised, so `weights` lines up position by position
    between branches whose keys are equal."""

    def __init__(self, b: _Branch, func: Func):
        self.b, self.func = b, func
        self.u = b.nz.result.type.shape[0]

    def key(self, v: Value) -> Any:
        if v not in self.b.rows:
            return self.leaf(v)
        op = v.op
        if v.type.rank != 2 or v.type.shape[0] != self.u:
            raise _Skip(f"{op.name} at {op.loc} in expert {self.b.expert} is not a [rows, n] "
                        f"value but {v.type}")
        if op.name == "tensor.take" and op.axis == 0 and _nz_column(op.indices) == (self.b.nz, 0):
            if self.b.x_take is not None and self.b.x_take.x is not op.x:
                raise _Skip(f"expert {self.b.expert} gathers rows of two different tensors")
            self.b.x_take = self.b.x_take or op
            return ("x",)
        if op.name == "tensor.matmul" and op.rhs not in self.b.rows:
            return ("matmul", self.key(op.lhs), self.leaf(op.rhs))
        if isinstance(op, ELEMENTWISE):
            attrs = tuple(sorted((k, repr(a)) for k, a in op.attributes.items()))
            return (op.name, attrs) + tuple(self.key(a) for a in op.operand_values)
        raise _Skip(f"{op.name} at {op.loc} in expert {self.b.expert} is neither elementwise nor "
                    "a matmul against a weight")

    def leaf(self, v: Value) -> Any:
        w = _expert_weight(v, self.b.expert, self.func)
        if w is not None:
            self.b.weights.append(w)
            return ("weight", str(v.type))
        if _op(v, "tensor.constant") is not None:
            return ("const", repr(np.asarray(v.op.value).tolist()), str(v.type))
        return ("value", id(v))  # shared by all experts: must be the very same value


# ---- the chain of branches ------------------------------------------------------------------

def _chains(block: Block) -> list[list[Op]]:
    """Maximal chains acc0 → index_add → index_add → ... where each link is the next one's
    only use as the accumulator, kept when some link is indexed by a nonzero (MoE-like)."""
    chains = []
    for op in block.ops:
        if op.name != "tensor.index_add" or _next_link(op.x.op) is op:
            continue
        chain = [op]
        while (nxt := _next_link(chain[-1])) is not None:
            chain.append(nxt)
        if any(_nz_column(ia.indices) is not None for ia in chain):
            chains.append(chain)
    return chains


def _next_link(op: Op | None) -> Op | None:
    if op is None or op.name != "tensor.index_add" or len(op.result.uses) != 1:
        return None
    user, pos = op.result.uses[0]
    return user if user.name == "tensor.index_add" and pos == 0 else None


@dataclass
class _Plan:
    """A checked chain: what the rewrite reads."""

    chain: list[Op]  # the index_adds, in block order
    branches: list[_Branch]  # sorted by expert index
    x: Value
    topi: Value
    topw: Value
    acc0: Value

    @property
    def num_experts(self) -> int:
        return len(self.branches)

    @property
    def k(self) -> int:
        return self.topi.type.shape[1]


def _plan(chain: list[Op], func: Func) -> _Plan:
    branches = [_match_branch(ia, func) for ia in chain]
    b0 = branches[0]
    if b0.x_take is None:
        raise _Skip(f"expert {b0.expert} does not gather its rows of an input with where()[0]")
    experts = sorted(b.expert for b in branches)
    if experts != list(range(len(branches))):
        raise _Skip(f"expert indices {experts} are not 0..{len(branches) - 1} once each")
    for b in branches:
        if b.topi is not b0.topi or b.topw is not b0.topw or \
                b.x_take is None or b.x_take.x is not b0.x_take.x:
            raise _Skip(f"expert {b.expert} routes on other indices, weights or input than "
                        f"expert {b0.expert}")
        if b.key != b0.key:
            raise _Skip(f"expert {b.expert} computes a different function than expert "
                        f"{b0.expert} (at {b.index_add.loc})")
    x, topi = b0.x_take.x, b0.topi
    if x.type.rank != 2 or not dims_equal(x.type.shape[0], topi.type.shape[0]):
        raise _Skip("the experts' input is not one [N, d] tensor with a row per token")
    if not isinstance(topi.type.shape[1], int):
        raise _Skip(f"top-k width of {topi.type} is not static")
    return _Plan(chain, sorted(branches, key=lambda b: b.expert), x, topi, b0.topw, chain[0].x)


# ---- expert weights: one [E, ...] tensor per weight position --------------------------------

def _resolve_weights(plan: _Plan, rw: Rewriter, module: Module, func: Func
                     ) -> dict[Value, Value | None]:
    """For each expert-weight leaf of expert 0: the stacked [E, ...] weight to use on the routed
    rows, or None when every expert uses the very same tensor (it is then used as it is)."""
    out: dict[Value, tuple] = {}
    stacked: dict[tuple, Value | None] = {}
    for j, w0 in enumerate(plan.branches[0].weights):
        ws = [b.weights[j] for b in plan.branches]
        ident = tuple((id(w.source), w.stacked, w.transposed) for w in ws)
        if out.setdefault(w0.leaf, ident) != ident:
            raise _Skip("one weight of expert 0 stands for different weights of other experts")
        if ident not in stacked:
            stacked[ident] = _stack(ws, rw, module, func)
    return {leaf: stacked[ident] for leaf, ident in out.items()}


def _stack(ws: list[_Weight], rw: Rewriter, module: Module, func: Func) -> Value | None:
    E, w0 = len(ws), ws[0]
    if any((w.stacked, w.transposed) != (w0.stacked, w0.transposed) for w in ws):
        raise _Skip("experts spell the same weight in different ways")
    if w0.stacked:
        if any(w.source is not w0.source for w in ws) or w0.source.type.shape[0] != E:
            raise _Skip(f"expert weights are not slices of one [{E}, ...] tensor")
        if not w0.transposed:
            return w0.source
        perm = (0,) + tuple(range(w0.source.type.rank - 1, 0, -1))
        return rw.value("tensor.permute", w0.source, perm=perm, loc=w0.leaf.op.loc)
    if all(w.source is w0.source for w in ws):
        return None
    if len({id(w.source) for w in ws}) != E or any(w.source.name not in module.params for w in ws):
        raise _Skip("per-expert parameters are not distinct weights of the module")
    arrays = [module.params[w.source.name] for w in ws]
    stacked = np.stack([a.T if w0.transposed else a for a in arrays])
    name = _stacked_name([w.source.name for w in ws], module)
    module.params[name] = stacked
    return func.add_arg(TensorType(stacked.shape, w0.leaf.dtype), name, "param")


def _stacked_name(names: list[str], module: Module) -> str:
    """experts.0.w1.weight, experts.1.w1.weight → experts.w1.weight (the part that varies goes)."""
    parts = [n.split(".") for n in names]
    same = [len({len(p) for p in parts}) == 1 and len({p[i] for p in parts}) == 1
            for i in range(len(parts[0]))]
    base = ".".join(s for s, keep in zip(parts[0], same) if keep) or names[0]
    name, i = base + ".stacked", 1
    while name in module.params:
        name, i = f"{base}.stacked{i}", i + 1
    return name


# ---- the rewrite ---------------------------------------------------------------------------

@dataclass
class _Emitter:
    """Builds the moe-dialect form of expert 0's body on the routed rows."""

    rw: Rewriter
    plan: _Plan
    weights: dict[Value, Value | None]
    xs: Value  # gathered rows [M, d]
    perm: Value
    offsets: Value
    done: dict[Value, Value] = field(default_factory=dict)
    expert_of_row: Value | None = None

    def emit(self, v: Value) -> Value:
        b0 = self.plan.branches[0]
        if v not in b0.rows:
            return self.leaf(v)
        if v not in self.done:
            op = v.op
            if op.name == "tensor.take":
                self.done[v] = self.xs
            elif op.name == "tensor.matmul":
                self.done[v] = self.matmul(op)
            else:
                args = [self.emit(a) for a in op.operand_values]
                self.done[v] = self.rw.value(op.name, *args, loc=op.loc, **op.attributes)
        return self.done[v]

    def matmul(self, op: Op) -> Value:
        lhs, w = self.emit(op.lhs), self.weights.get(op.rhs)
        if w is None:  # the same matrix for every expert
            return self.rw.value("tensor.matmul", lhs, op.rhs, loc=op.loc)
        return self.rw.value("moe.grouped_matmul", lhs, w, self.offsets, loc=op.loc)

    def leaf(self, v: Value) -> Value:
        w = self.weights.get(v)
        if w is None:
            return v
        if w.type.rank != 2:
            raise _Skip(f"a per-expert weight of type {v.type} is used outside a matmul")
        # A per-expert vector (a bias): each routed row reads its own expert's row.
        return self.rw.value("tensor.take", w, self.row_experts(), axis=0, loc=v.op.loc)

    def row_experts(self) -> Value:
        if self.expert_of_row is None:
            topi = self.plan.topi
            m = self.perm.type.shape[0]
            flat = self.rw.value("tensor.reshape", topi,
                                 result_type=topi.type.with_shape((m,)), loc=self.perm.op.loc)
            self.expert_of_row = self.rw.value("tensor.take", flat, self.perm, axis=0,
                                               loc=self.perm.op.loc)
        return self.expert_of_row


def _raise(plan: _Plan, module: Module, func: Func) -> Value:
    """Emits the moe ops before the last index_add and returns the new accumulated value."""
    last, b0 = plan.chain[-1], plan.branches[0]
    rw = Rewriter()
    rw.set_insertion_point(last)
    route_loc = plan.topi.op.loc if plan.topi.op is not None else b0.nz.loc
    perm, offsets = rw.create("moe.route", [plan.topi], {"num_experts": plan.num_experts},
                              loc=route_loc).result_values
    xs = rw.value("moe.gather", plan.x, perm, k=plan.k, loc=b0.x_take.loc)
    weights = _resolve_weights(plan, rw, module, func)
    y = _Emitter(rw, plan, weights, xs, perm, offsets).emit(b0.y)
    out = rw.value("moe.combine", y, perm, plan.topw, loc=b0.index_add.loc)
    if out.type != plan.acc0.type:
        raise _Skip(f"combined output {out.type} does not match the accumulator "
                    f"{plan.acc0.type}")
    if splat_value(plan.acc0) != 0:
        out = rw.value("tensor.add", plan.acc0, out, loc=b0.index_add.loc)
    rw.replace_all_uses(last.result, out)
    return out


def _undo(func: Func, block_before: list[Op], args_before: int, module: Module) -> None:
    """Remove what a failed rewrite added (ops and stacked params), restoring the block."""
    kept = set(map(id, block_before))
    for op in reversed(list(func.body.ops)):
        if id(op) not in kept:
            op.drop_operands()
            func.body.remove(op)
    for a in func.body.args[args_before:][::-1]:
        module.params.pop(a.name, None)
        func.remove_arg(a)


def _erase_dead_from(roots: list[Op], module: Module, func: Func) -> int:
    """Erase `roots` and what becomes dead with them (only that: other dead code is DCE's);
    per-expert parameters left without uses go too."""
    erased, todo = 0, list(roots)
    while todo:
        op = todo.pop()
        if op.parent is None or not op.pure or any(v.uses for v in op.result_values):
            continue
        operands = list(op.operand_values)
        op.drop_operands()
        op.parent.remove(op)
        erased += 1
        todo += [v.op for v in operands if v.op is not None]
        for v in operands:
            if v.op is None and not v.uses and v in func.body.args and \
                    func.arg_kinds[func.body.args.index(v)] == "param":
                func.remove_arg(v)
                prune_params(module, [v.name])
    return erased


@register_pass
@dataclass(frozen=True)
class RaiseMoE(Pass):
    """Rewrite unrolled per-expert MoE loops (nonzero + index_add) into the moe dialect."""

    name = "raise-moe"

    def run(self, module: Module) -> dict[str, Any]:
        report: dict[str, Any] = {"raised": 0, "skipped": [], "layers": []}
        for func in module.funcs.values():
            for chain in _chains(func.body):
                self._one(chain, module, func, report)
        return report

    def _one(self, chain: list[Op], module: Module, func: Func, report: dict) -> None:
        ops_before, args_before = list(func.body.ops), len(func.body.args)
        try:
            plan = _plan(chain, func)
            _raise(plan, module, func)
        except (_Skip, LmcError) as exc:
            _undo(func, ops_before, args_before, module)
            report["skipped"].append(f"MoE at {chain[0].loc}: {exc}")
            return
        # Every op of the branches is a root: torch.export leaves extra `where(...)[0]` reads
        # (for its size asserts) that would otherwise keep each nonzero alive.
        branch_ops = [v.op for b in plan.branches for v in b.rows if v.op is not None]
        erased = _erase_dead_from(list(plan.chain) + branch_ops, module, func)
        report["raised"] += 1
        report["layers"].append({"loc": str(plan.branches[0].index_add.loc),
                                 "experts": plan.num_experts, "k": plan.k, "erased_ops": erased})
