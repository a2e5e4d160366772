"""fuse: outline groups of tensor ops into `kernel.fused` ops, the kernels a backend compiles.

Groups, formed in this order (each op joins at most one group):
1. anchors — every `tensor.matmul` / `moe.grouped_matmul` with its elementwise epilogue (bias,
   activation, residual, scale: the elementwise consumers of the same shape of what the
   kernel computes, and the single-use elementwise producers of the same shape of what they
   read; a value also used outside is one more kernel result), a LoRA branch `(x·Aᵀ)·Bᵀ·s`
   added to a base matmul of the same `x` joins its base matmul; every `tensor.attention`
   alone;
2. reductions — softmax / log_softmax / layer_norm / rms_norm / sum / mean / max / min over
   trailing axes, with elementwise producers (prologue) and consumers (epilogue), and further
   reductions over the same rows (a hand-written LayerNorm is one kernel); sum / mean / max /
   min over axes that keep the last one (column reductions: bias and LayerNorm-weight
   gradients) with their prologue and an epilogue on the reduced values, never a consumer that
   broadcasts a reduced value back over the data (that would need a second pass);
3. the remaining elementwise ops, in connected groups of one domain shape.

Legality: groups are nodes of a networkx graph of the function; an op joins a group only if the
contracted graph stays acyclic, and a value a consumer outside the group also needs is written
out as a kernel result. With dumps on, the index lists every fusion the pass declined and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from lmc.ir.analysis import same_rows_gemms
from lmc.ir.core import Block, Func, Module, Op, Region, Value
from lmc.ir.ops import OPS, op_class
from lmc.ir.ops.tensor import ARITH, COMPARE, LOGICAL, Unary
from lmc.ir.types import dims_equal, normalize_axis
from lmc.pass_base import Pass, register_pass
from lmc.passes.dce import eliminate_dead_ops

ELEMENTWISE = frozenset(
    [n for n, c in OPS.items() if issubclass(c, Unary)] + list(ARITH + COMPARE + LOGICAL) +
    ["tensor.where", "tensor.cast"])
ROW_OPS = frozenset(["tensor.softmax", "tensor.log_softmax", "tensor.layer_norm",
                     "tensor.rms_norm", "tensor.sum", "tensor.mean", "tensor.max",
                     "tensor.min"])
REDUCTIONS = frozenset(["tensor.sum", "tensor.mean", "tensor.max", "tensor.min"])
ANCHORS = {"tensor.matmul": "matmul", "moe.grouped_matmul": "grouped_matmul"}


def row_axes(op: Op) -> tuple[int, ...]:
    """The axes a row op reduces, normalized and sorted."""
    rank = op.x.type.rank
    if op.name in ("tensor.softmax", "tensor.log_softmax"):
        return (normalize_axis(op.axis, rank),)
    if op.name in ("tensor.layer_norm", "tensor.rms_norm"):
        return tuple(range(rank - op.num_axes, rank))
    return tuple(sorted(normalize_axis(a, rank) for a in (op.axes or range(rank))))


def reduced_axes(op: Op) -> int | None:
    """How many trailing axes a row op reduces, or None when they are not trailing."""
    axes, rank = row_axes(op), op.x.type.rank
    return len(axes) if axes == tuple(range(rank - len(axes), rank)) and axes else None


def column_axes(op: Op) -> tuple[int, ...] | None:
    """The axes a sum/mean/max/min reduces when it keeps a last axis longer than 1 (a column
    reduction: one pass down the columns), else None."""
    if op.name not in REDUCTIONS or op.x.type.rank < 2 or op.x.type.shape[-1] == 1:
        return None
    axes = row_axes(op)
    return axes if axes and op.x.type.rank - 1 not in axes else None


def kernel_axes(op: Op) -> tuple[int, ...] | None:
    """The axes of a reduction kernel anchored at `op`, or None when it cannot anchor one."""
    return row_axes(op) if reduced_axes(op) is not None else column_axes(op)


def _peel_scale(v: Value) -> tuple[Value, list[Op]]:
    """(what `v` scales, [the scaling op]) for `v = u · c` or `u / c` (c a scalar constant)."""
    op = v.op
    if op is not None and op.name in ("tensor.mul", "tensor.div") and \
            _is_scalar_constant(op.rhs):
        return op.lhs, [op]
    return v, []


def _is_scalar_constant(v: Value) -> bool:
    op = v.op
    return op is not None and op.name == "tensor.constant" and v.type.is_static and \
        all(d == 1 for d in v.type.shape)


def _fits(shape: tuple, domain: tuple) -> bool:
    """`shape` broadcasts to `domain` (right-aligned numpy rules) without growing it."""
    if len(shape) > len(domain):
        return False
    tail = domain[len(domain) - len(shape):]
    return all(d == 1 or dims_equal(d, t) for d, t in zip(shape, tail))


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def _where(op: Op) -> str:
    return f"{op.name} at {op.loc}"


@dataclass
class Group:
    kind: str
    anchor: Op
    ops: list[Op]
    domain: tuple = ()
    axes: tuple[int, ...] = ()  # the axes a reduction kernel reduces

    @property
    def columns(self) -> bool:
        """A reduction keeping the last axis: its kernel reads each element once."""
        return bool(self.axes) and len(self.domain) - 1 not in self.axes


@dataclass
class _Fuser:
    """Group formation over one function body: a quotient graph kept acyclic by construction."""

    func: Func
    rejected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ops = [op for op in self.func.body.ops if op.name != "func.return"]
        self.group_of: dict[int, int] = {}   # id(op) → group node
        self.groups: dict[int, Group] = {}
        self.graph = nx.DiGraph()
        for i, op in enumerate(self.ops):
            self.graph.add_node(i)
            self.group_of[id(op)] = i
        for i, op in enumerate(self.ops):
            for v in op.operand_values:
                if v.op is not None and id(v.op) in self.group_of:
                    self.graph.add_edge(self.group_of[id(v.op)], i)
        self.singletons = set(range(len(self.ops)))

    # -- graph bookkeeping ---------------------------------------------------------------------

    def free(self, op: Op | None) -> bool:
        return op is not None and id(op) in self.group_of and \
            self.group_of[id(op)] in self.singletons

    def cycle_through(self, a: int, b: int) -> int | None:
        """A node on a path a → … → b or b → … → a other than a direct edge (merging a and b
        would make it a cycle), or None."""
        for x, y in ((a, b), (b, a)):
            for s in self.graph.successors(x):
                if s != y and nx.has_path(self.graph, s, y):
                    return s
        return None

    def try_join(self, gid: int, op: Op, group: Group) -> str | None:
        """Add `op` to group `gid`; returns why not (and changes nothing) when illegal."""
        node = self.group_of[id(op)]
        via = self.cycle_through(gid, node)
        if via is not None:
            return f"it would make a cycle through {_where(self._any_op(via))}"
        nx.contracted_nodes(self.graph, gid, node, self_loops=False, copy=False)
        self.singletons.discard(node)
        self.group_of[id(op)] = gid
        group.ops.append(op)
        return None

    def _any_op(self, node: int) -> Op:
        if node in self.groups:
            return self.groups[node].anchor
        return self.ops[node]

    def new_group(self, op: Op, kind: str, domain: tuple = (), axes: tuple = ()) -> int:
        gid = self.group_of[id(op)]
        self.singletons.discard(gid)
        self.groups[gid] = Group(kind, op, [op], domain, axes)
        return gid

    def reject(self, op: Op, group: Group, why: str) -> None:
        self.rejected.append(f"{_where(op)} not fused into the {group.kind} kernel of "
                             f"{_where(group.anchor)}: {why}")

    # -- 1. anchors ----------------------------------------------------------------------------

    def grow_anchor(self, op: Op) -> None:
        """A matmul / grouped matmul, the chain of its elementwise consumers, the elementwise
        producers of what that chain reads, then every further elementwise consumer of the
        matmul's shape of a value the kernel computes (the kernel writes each value used
        outside it as one more result)."""
        gid = self.new_group(op, ANCHORS[op.name])
        group = self.groups[gid]
        self._grow_epilogue(op, gid, group)
        self._pull_operand_producers(gid, group)
        while self._grow_epilogue_outputs(gid, group):
            self._pull_operand_producers(gid, group)

    def _pull_operand_producers(self, gid: int, group: Group) -> None:
        """An epilogue operand made by a single-use elementwise op of the matmul's own shape
        (a backward graph's `g·W ⊙ gelu'(h)`) is computed in the epilogue from its inputs: the
        kernel reads h instead of an intermediate written out and read back."""
        shape, dtype = group.anchor.result.type.shape, group.anchor.result.dtype
        todo = [o for o in group.ops if o.name in ELEMENTWISE]
        while todo:
            for v in todo.pop().operand_values:
                p = v.op
                if self.free(p) and p.name in ELEMENTWISE and len(v.uses) == 1 and \
                        v.dtype is dtype and _same_shape(v.type.shape, shape) and \
                        self.try_join(gid, p, group) is None:
                    todo.append(p)
                elif self._sibling(p, group):
                    why = self.try_join(gid, p, group)
                    if why is not None:
                        self.reject(p, group, why)

    def _sibling(self, p: Op | None, group: Group) -> bool:
        """A second GEMM on the anchor's rows whose only use is the epilogue (SwiGLU's x·W3
        in silu(x·W1)·(x·W3)): joined, the backend computes both as one GEMM over x, and
        x·W3 never goes to memory. One per kernel, of the anchor's kind, routing and shape,
        with 2-D (or per-expert) weights; not beside a LoRA branch (its GEMMs are the
        kernel's prologue)."""
        a = group.anchor
        if not self.free(p) or len(p.result.uses) != 1 or not same_rows_gemms(a, p) or \
                sum(o.name == a.name for o in group.ops) != 1:
            return False
        x, w = a.operand_values[:2]
        return a.name == "moe.grouped_matmul" or (w.type.rank == 2 and x.type.rank >= 2)

    def _grow_epilogue(self, op: Op, gid: int, group: Group) -> None:
        cur = op.result
        while True:
            users = cur.users
            if len(cur.uses) != 1:  # the fan-out joins in _grow_epilogue_outputs
                return
            user = users[0]
            why = self._epilogue_misfit(user, cur, group)
            if why is None and self._lora_branch(user, op, gid, group) is False:
                why = "the LoRA branch could not join"
            if why is None:
                why = self.try_join(gid, user, group)
            if why is not None:
                if user.name != "func.return":
                    self.reject(user, group, why)
                return
            cur = user.result

    def _grow_epilogue_outputs(self, gid: int, group: Group) -> bool:
        """Elementwise consumers of the matmul's shape of any value the kernel computes, where
        that value also has other users: a train step's `h = x·W` that both gelu(h) and the
        backward read, an optimizer update of the weight gradient `dW = xᵀ·g` (g² and g − m).
        The tile epilogue computes them while the tile is in registers and stores each value
        used outside the kernel; separately, each would be a pass over [M, N] in memory."""
        changed = False
        for v, user in self._users_outside(group):
            why = self._epilogue_misfit(user, v, group) or self.try_join(gid, user, group)
            if why is None:
                changed = True
            elif user.name in ELEMENTWISE:
                self.reject(user, group, why)
        return changed

    def _users_outside(self, group: Group):
        """(value, user) for each user outside the group (a function result aside) of a value
        the group's ops computed when the walk started (users that join meanwhile skipped)."""
        for member in list(group.ops):
            for v in member.result_values:
                for user in v.users:
                    if user not in group.ops and user.name != "func.return":
                        yield v, user

    def _epilogue_misfit(self, user: Op, cur: Value, group: Group) -> str | None:
        if user.name == "func.return":
            return "it is a function result"
        if not self.free(user):
            return "it is already in another kernel"
        if user.name in ROW_OPS:
            return "a reduction needs whole rows, not the tiles a matmul epilogue sees"
        if user.name not in ELEMENTWISE:
            return f"{user.name} is not elementwise"
        if not _same_shape(user.result.type.shape, cur.type.shape):
            return f"its result {user.result.type} is larger than the matmul's {cur.type}"
        if user.result.dtype is not group.anchor.result.dtype:
            # The GEMM driver runs the epilogue in place in its C buffer, of the anchor's dtype
            # (a bf16 model's `cast(f32 matmul → bf16)` starts an elementwise kernel instead).
            return f"its result is {user.result.dtype.value}, the matmul's C buffer " \
                   f"{group.anchor.result.dtype.value}"
        return None

    def _lora_branch(self, add: Op, base: Op, gid: int, group: Group) -> bool | None:
        """If `add` adds `s·((x·Aᵀ)·Bᵀ)` with x the base matmul's lhs, pull that branch in.
        None: no branch here; True: joined; False: a branch that cannot join."""
        if add.name != "tensor.add" or base.name != "tensor.matmul":
            return None
        other = add.rhs if add.lhs.op is not None and add.lhs.op in group.ops else add.lhs
        v, outer = _peel_scale(other)
        up = v.op
        if up is None or up.name != "tensor.matmul":
            return None
        v, inner = _peel_scale(up.lhs)  # the scale may sit between the two (x·Aᵀ·s)·Bᵀ
        down = v.op
        if down is None or down.name != "tensor.matmul" or down.lhs is not base.lhs:
            return None
        chain = [*outer, up, *inner, down]
        if any(len(c.result.uses) != 1 or not self.free(c) for c in chain):
            return False
        return all(self.try_join(gid, c, group) is None for c in reversed(chain))

    # -- 2. reductions and 3. elementwise groups -----------------------------------------------

    def grow_rows(self, op: Op, kind: str) -> None:
        """A reduction (or elementwise op) with its producers and consumers over one domain."""
        if kind == "reduction":
            domain, axes = op.x.type.shape, kernel_axes(op)
        else:
            domain, axes = op.result.type.shape, ()
        gid = self.new_group(op, kind, domain, axes)
        group = self.groups[gid]
        changed = True
        while changed:
            changed = self._grow_producers(gid, group) | self._grow_consumers(gid, group)

    def _grow_producers(self, gid: int, group: Group) -> bool:
        changed = False
        for member in list(group.ops):
            for v in member.operand_values:
                p = v.op
                if p is None or not self.free(p) or p.name not in ELEMENTWISE:
                    continue
                # A function result may join: the kernel yields it as one more output (an
                # optimizer's new moments are results and inputs of the parameter update).
                outside = [u for u in v.users if u not in group.ops and u.name != "func.return"]
                if outside:
                    continue  # computing it here and again outside would do the work twice
                if not _fits(p.result.type.shape, group.domain):
                    continue
                if self.try_join(gid, p, group) is None:
                    changed = True
        return changed

    def _grow_consumers(self, gid: int, group: Group) -> bool:
        changed = False
        for _, u in self._users_outside(group):
            if not self.free(u):
                continue
            why = self._consumer_misfit(u, group) or self.try_join(gid, u, group)
            if why is None:
                changed = True
            elif u.name in ELEMENTWISE or u.name in ROW_OPS:
                self.reject(u, group, why)
        return changed

    def _consumer_misfit(self, u: Op, group: Group) -> str | None:
        shape = u.result_values[0].type.shape if u.result_values else ()
        if u.name in ROW_OPS:
            if group.kind != "reduction" or kernel_axes(u) != group.axes or \
                    not _same_shape(u.x.type.shape, group.domain):
                return "it reduces other rows than this kernel"
            return None
        if u.name not in ELEMENTWISE:
            return f"{u.name} is not elementwise"
        if group.kind == "reduction" and _same_reduced(shape, group):
            return None
        if _same_shape(shape, group.domain):
            if group.columns:
                return "a column reduction kernel reads its data once, so it cannot apply a " \
                       "reduced value back to it"
            return None
        return f"its shape {list(shape)} is not the kernel's domain {list(group.domain)}"

    def reject_dups(self) -> list[str]:
        return list(dict.fromkeys(self.rejected))


def _same_reduced(shape: tuple, group: Group) -> bool:
    """The reduced shape of a reduction kernel, with or without the kept size-1 dims."""
    kept = tuple(d for a, d in enumerate(group.domain) if a not in group.axes)
    keepdim = tuple(1 if a in group.axes else d for a, d in enumerate(group.domain))
    return _same_shape(shape, kept) or _same_shape(shape, keepdim)


# ---- outlining -------------------------------------------------------------------------------

def outline(group: Group, block: Block) -> Op:
    """Replace the group's ops by one kernel.fused op with the ops as its body."""
    order = {id(op): i for i, op in enumerate(block.ops)}
    members = sorted(group.ops, key=lambda op: order[id(op)])
    inside = {id(op) for op in members}
    inputs: list[Value] = []
    constants: list[Op] = []
    for op in members:
        for v in op.operand_values:
            if v.op is not None and id(v.op) in inside:
                continue
            if _is_scalar_constant(v):
                if v.op not in constants:
                    constants.append(v.op)
            elif v not in inputs:
                inputs.append(v)
    outputs = [v for op in members for v in op.result_values
               if any(id(u) not in inside for u, _ in v.uses)]
    body = Block([v.type for v in inputs])
    mapping: dict[Value, Value] = dict(zip(inputs, body.args))
    for op in constants + members:
        body.append(op.clone([mapping[v] for v in op.operand_values], mapping))
    body.append(op_class("kernel.yield")([mapping[v] for v in outputs]))
    fused = op_class("kernel.fused")(inputs, {"kind": group.kind}, [v.type for v in outputs],
                                    [Region([body])], group.anchor.loc)
    block.insert(order[id(members[-1])] + 1, fused)
    for old, new in zip(outputs, fused.result_values):
        for user, i in list(old.uses):
            if id(user) not in inside:
                user.set_operand(i, new)
    for op in reversed(members):
        op.drop_operands()
        block.remove(op)
    return fused


def topological_order(block: Block) -> None:
    """Re-sort `block` so every op follows its operands' definitions, keeping the original
    order wherever it already is one (outlined kernels sit at their last member's place)."""
    ops = block.ops
    index = {id(op): i for i, op in enumerate(ops)}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(ops)))
    for i, op in enumerate(ops):
        for v in op.operand_values:
            if v.op is not None and id(v.op) in index:
                g.add_edge(index[id(v.op)], i)
    block.ops = [ops[i] for i in nx.lexicographical_topological_sort(g)]


def fuse_func(func: Func, epilogues: bool = True) -> tuple[dict[str, int], list[str]]:
    fuser = _Fuser(func)
    for op in fuser.ops:
        if op.name in ANCHORS and fuser.free(op):
            if epilogues:
                fuser.grow_anchor(op)
            else:
                fuser.new_group(op, ANCHORS[op.name])
        elif op.name == "tensor.attention" and fuser.free(op):
            fuser.new_group(op, "attention")
    for op in fuser.ops:
        if op.name in ROW_OPS and fuser.free(op) and kernel_axes(op) is not None:
            fuser.grow_rows(op, "reduction")
    for op in fuser.ops:
        if op.name in ELEMENTWISE and fuser.free(op):
            fuser.grow_rows(op, "elementwise")
    counts: dict[str, int] = {}
    for group in fuser.groups.values():
        outline(group, func.body)
        counts[group.kind] = counts.get(group.kind, 0) + 1
    topological_order(func.body)
    eliminate_dead_ops(func.body)
    return counts, fuser.reject_dups()


@register_pass
@dataclass(frozen=True)
class Fuse(Pass):
    """Outline matmul/attention/reduction/elementwise groups into kernel.fused ops."""

    name = "fuse"
    epilogues: bool = True  # fuse elementwise consumers into matmul kernels

    def run(self, module: Module) -> dict[str, Any]:
        report: dict[str, Any] = {}
        rejected: list[str] = []
        for f in module.funcs.values():
            counts, why = fuse_func(f, self.epilogues)
            for k, n in counts.items():
                report[k] = report.get(k, 0) + n
            rejected += why
        if rejected:
            report["rejected"] = rejected
        return report
