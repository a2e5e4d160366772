"""torch.export → lmc IR: export, name the arguments and symbols, run the converter table.

`import_module(model, example_inputs, dynamic_shapes)` returns a Module with one func `@main`:
forward() inputs are `input` args, trainable parameters `{param}` args named by state_dict key,
buffers, lifted constants and frozen parameters (requires_grad=False) `{buffer}` args.
"""
from __future__ import annotations

import inspect
import operator
import os
import re

import numpy as np
import torch

from lmc.errors import LmcError, UnsupportedOpError
from lmc.frontends.torch import aten_elementwise, aten_index, aten_nn, aten_views  # noqa: F401
from lmc.frontends.torch.context import CONVERTERS, Ctx, NotConvertible, converter
from lmc.interop import to_numpy
from lmc.ir.core import Block, Func, Location, Module, Value
from lmc.ir.rewriter import Rewriter
from lmc.ir.verifier import verify


@converter(torch.ops.higher_order.wrap_with_set_grad_enabled)
def wrap_with_set_grad_enabled(cx: Ctx, enabled, body, *operands):
    """A `with torch.no_grad():` block: inline its subgraph (grad mode means nothing here)."""
    env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], operands))
    outer = cx.graph_module
    convert_graph(body, cx, env, cx.failed)
    cx.graph_module = outer
    out = next(n for n in body.graph.nodes if n.op == "output").args[0]
    return tuple(env.get(n) for n in out) if isinstance(out, (tuple, list)) else env[out]


class TorchExportError(LmcError):
    """torch.export could not trace the model; wraps torch's message with what to try."""


# ---- export --------------------------------------------------------------------------------

def export(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None):
    try:
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise TorchExportError(
            f"torch.export failed on {type(model).__name__}: {type(exc).__name__}: "
            f"{first[0] if first else ''}\n" + "\n".join(first[1:8]) +
            "\nTry torch.export.draft_export(model, args) to list every problem; for "
            "dynamic shapes, give each torch.export.Dim a range the model supports "
            "(e.g. Dim('T', max=block_size - 1) when the model slices a buffer by T)."
        ) from None


def symbol_names(ep, model, example_inputs, dynamic_shapes) -> dict[str, str]:
    """torch symbol (s77) -> the user's Dim name (T), by walking the spec over the inputs."""
    if not dynamic_shapes:
        return {}
    try:
        bound = inspect.signature(model.forward).bind(*example_inputs).arguments
    except TypeError:
        bound = {f"arg{i}": x for i, x in enumerate(example_inputs)}
    if isinstance(dynamic_shapes, dict):
        specs = [dynamic_shapes.get(k) for k in bound]
    else:
        specs = list(dynamic_shapes)
    pairs: list = []
    for value, spec in zip(bound.values(), specs):
        _walk(value, spec, pairs)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and
                    n.name in _user_inputs(ep)]
    names: dict[str, str] = {}
    for node, (_, spec) in zip(placeholders, pairs):
        shape = node.meta["val"].shape
        items = spec.items() if isinstance(spec, dict) else enumerate(spec or ())
        for axis, d in items:
            name = getattr(d, "__name__", None)
            expr = shape[axis].node.expr if isinstance(shape[axis], torch.SymInt) else None
            if name and expr is not None and expr.is_Symbol and name.isidentifier():
                names[expr.name] = name
    return names


def _walk(value, spec, out: list) -> None:
    """Pair each tensor leaf of an input with its per-axis spec, in pytree order."""
    if isinstance(value, torch.Tensor):
        out.append((value, spec))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, spec[i] if isinstance(spec, (list, tuple)) else None, out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, spec.get(k) if isinstance(spec, dict) else None, out)


def _user_inputs(ep) -> set[str]:
    from torch.export.graph_signature import InputKind
    return {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


# ---- locations -----------------------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in')
_INTERNAL = (f"{os.sep}torch{os.sep}", f"{os.sep}transformers{os.sep}")


def location(node: torch.fx.Node) -> Location:
    """Module path from nn_module_stack; file:line of the last user frame of the stack trace
    (the last frame outside torch/transformers, else outside torch, else the last one)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for k, v in stack.items() if not k.startswith("_empty")]
    path = _clean_path(paths[-1]) if paths else ""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [f for f in frames if not any(s in f[0] for s in _INTERNAL)]
    not_torch = [f for f in frames if f"{os.sep}torch{os.sep}" not in f[0]]
    pick = (user or not_torch or frames or [("", 0)])[-1]
    return Location(path, os.path.basename(pick[0]), int(pick[1]))


def _clean_path(p: str) -> str:
    # Strict-mode export writes L['self'].blocks[0].attn; non-strict writes blocks.0.attn.
    p = re.sub(r"^L\['self'\]\.?", "", p)
    return re.sub(r"\[(\d+)\]", r".\1", p).lstrip(".")


def loc_text(loc: Location) -> str:
    src = f" ({loc.file}:{loc.line})" if loc.file else ""
    return f"{loc.path or '<top>'}{src}"


# ---- import --------------------------------------------------------------------------------

def import_module(model: torch.nn.Module, example_inputs: tuple,
                  dynamic_shapes=None) -> Module:
    """Export `model` with torch.export and convert it to an lmc Module (func @main)."""
    ep = export(model, example_inputs, dynamic_shapes)
    symbols = symbol_names(ep, model, example_inputs, dynamic_shapes)
    missing = [(_op_name(n), loc_text(location(n))) for n in _all_nodes(ep.graph_module)
               if n.op == "call_function" and lookup(n.target) is None and not _is_scalar(n)]
    if missing:
        raise UnsupportedOpError(missing)
    module = Module()
    func = module.add_func(Func("main", Block()))
    cx = Ctx(Rewriter(func.body), symbols)
    env = _add_args(ep, model, func, module, cx)
    _convert_nodes(ep, cx, env)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    user_outs = _user_outputs(ep, out_node)
    odd = [repr(n) for n in user_outs if not isinstance(n, torch.fx.Node) or n not in env]
    if odd:  # ints, None or sizes among the outputs: the compiled model returns tensors only
        raise LmcError(f"{type(model).__name__}.forward returns non-tensor output(s) "
                       f"{', '.join(odd)}; return tensors only (compute sizes outside)")
    outs = [env[n] for n in user_outs]
    cx.rw.create("func.return", [o for o in outs if isinstance(o, Value)])
    _dce(func)
    module.meta["torch_out_spec"] = ep.call_spec.out_spec
    verify(module)
    return module


def _add_args(ep, model, func: Func, module: Module, cx: Ctx) -> dict:
    from torch.export.graph_signature import InputKind
    frozen = {k for k, p in model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    env: dict = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = specs[node.name]
        val = node.meta["val"]
        if spec.kind == InputKind.USER_INPUT:
            if isinstance(val, torch.Tensor):
                env[node] = func.add_arg(cx.ttype(val), node.name, "input")
            else:
                env[node] = val  # a non-tensor input was specialized into the graph
            continue
        name = spec.target
        array = (ep.state_dict[name] if name in ep.state_dict else ep.constants[name])
        array = np.ascontiguousarray(to_numpy(array))
        kind = "param" if spec.kind == InputKind.PARAMETER and name not in frozen else "buffer"
        env[node] = func.add_arg(cx.ttype(val), name, kind)
        module.params[name] = array
    return env


def _convert_nodes(ep, cx: Ctx, env: dict) -> None:
    """Convert every call_function node; collect all failures and raise them together."""
    failed: list[tuple[str, str]] = []
    convert_graph(ep.graph_module, cx, env, failed)
    if failed:
        raise UnsupportedOpError(failed)


def convert_graph(gm, cx: Ctx, env: dict, failed: list) -> None:
    cx.graph_module, cx.failed = gm, failed  # for converters that inline a subgraph
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = getattr(gm, node.target)  # a subgraph of a higher-order op
        if node.op != "call_function":
            continue
        cx.node, cx.loc = node, location(node)
        if _is_scalar(node):
            env[node] = _scalar(cx, node)
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if _has_failed(args, kwargs):
            env[node] = _FAILED  # depends on a node that failed: reported there
            continue
        try:
            env[node] = lookup(node.target)(cx, *args, **kwargs)
        except NotConvertible as exc:
            failed.append((f"{_op_name(node)} ({exc})", loc_text(cx.loc)))
            env[node] = _FAILED
            continue
        if _is_inplace(node):
            env[node.args[0]] = env[node]  # later uses of the mutated tensor see the new value


def lookup(target):
    """The converter of `target`; an in-place overload (div_) uses its functional one's."""
    if target in CONVERTERS:
        return CONVERTERS[target]
    if isinstance(target, torch._ops.OpOverload) and _is_inplace_schema(target):
        base = getattr(torch.ops.aten, target.__name__.split(".")[0].rstrip("_"), None)
        functional = getattr(base, target._overloadname, None) if base is not None else None
        return CONVERTERS.get(functional)
    return None


def _all_nodes(gm):
    """The nodes of a graph and of its higher-order-op subgraphs (torch.no_grad() blocks)."""
    for node in gm.graph.nodes:
        yield node
        if node.op == "get_attr" and isinstance(getattr(gm, node.target, None),
                                                torch.fx.GraphModule):
            yield from _all_nodes(getattr(gm, node.target))


_FAILED = object()


def _has_failed(args, kwargs) -> bool:
    found = []
    torch.fx.node.map_aggregate((args, kwargs), lambda v: found.append(v is _FAILED))
    return any(found)


def _is_inplace(node) -> bool:
    return _is_inplace_schema(node.target)


def _is_inplace_schema(target) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return bool(alias and alias.is_write)


def _is_scalar(node) -> bool:
    """Nodes computing sizes or asserts (sym_size, s0 // 2, _assert_scalar): no tensor data."""
    if lookup(node.target) is not None and node.target is not operator.getitem:
        return False
    val = node.meta.get("val")
    return node.target is not operator.getitem and not isinstance(val, torch.Tensor) and (
        val is None or isinstance(val, (int, float, bool, torch.SymInt, torch.SymBool,
                                        torch.SymFloat)))


def _scalar(cx: Ctx, node):
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
        return cx.dim(val)  # a size: converters read it as a (possibly symbolic) dim
    return None  # asserts and predicates: shapes are already checked by the result types


def _user_outputs(ep, out_node) -> list:
    from torch.export.graph_signature import OutputKind
    kinds = [s.kind for s in ep.graph_signature.output_specs]
    return [n for n, k in zip(out_node.args[0], kinds) if k == OutputKind.USER_OUTPUT]


def _op_name(node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if not isinstance(t, torch._ops.OpOverload) else \
        str(t)


def _dce(func: Func) -> None:
    """Drop ops whose results are unused (e.g. the where() coordinates a model ignores)."""
    for op in reversed(list(func.body.ops)):
        if op.name != "func.return" and op.pure and not any(v.uses for v in op.result_values):
            op.drop_operands()
            func.body.remove(op)
