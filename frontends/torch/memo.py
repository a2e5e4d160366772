"""The import memo: a second `lmc.compile` of the same, unchanged module object in one process
skips torch.export (most of a warm compile: ~0.18 s of the GPT block's ~0.22 s).

What torch.export would see again is summed up in a *guard*: per submodule its class, its
forward functions (class and instance), its training flag, its hooks and every other attribute
(numbers, strings and flags by value; containers and plain objects such as a Hugging Face
`config` by their contents, two levels deep; anything else by identity); per parameter and
buffer the tensor itself (identity, storage, shape, dtype, requires_grad); the example inputs'
shapes and dtypes; the dynamic-shape spec; torch's default dtype and grad mode. An equal guard
reuses the imported IR (the memo's copy: `lmc.compile` clones it only when it runs the passes,
not on a compile-cache hit). The IR's weights are views of the
module's tensors, so in-place weight updates need no re-import; the cache key still hashes
them.

Not guarded: state a forward reads outside its module (globals, closures, environment). A
model that branches on such state must be compiled with the cache off
(`CompileOptions(cache_dir="off")` or `LMC_CACHE_DIR=off`), which turns the memo off too.
"""
from __future__ import annotations

import weakref

import torch

from lmc.ir.core import Module
from lmc.ir.printer import print_module

_PLAIN = (bool, int, float, str, bytes, type(None))
_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def guard(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes) -> tuple:
    """Everything of `model` and its call that decides the exported graph, as a comparable
    value (see the module docstring)."""
    seen: dict = {}
    modules = tuple(_module_guard(name, m, seen) for name, m in model.named_modules())
    tensors = tuple((name, id(t), t.data_ptr(), tuple(t.shape), t.dtype, t.requires_grad)
                    for name, t in (*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)))
    inputs = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                   for x in example_inputs)
    return (modules, tensors, inputs, repr(dynamic_shapes), torch.get_default_dtype(),
            torch.is_grad_enabled())


# A torch.nn.Module's own bookkeeping: parameters, buffers and submodules are guarded as
# tensors and modules; hooks and the training flag explicitly.
_MODULE_FIELDS = frozenset(vars(torch.nn.Module()))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_pre_hooks_with_kwargs", "_state_dict_hooks")


def _module_guard(name: str, m: torch.nn.Module, seen: dict) -> tuple:
    attrs = tuple(sorted((k, _state(v, 2, seen)) for k, v in vars(m).items()
                         if k not in _MODULE_FIELDS))
    # Identities, not the objects: a bound method of the model kept in the memo's value would
    # keep its weak key (the model) alive for good.
    hooks = tuple(tuple((k, id(fn)) for k, fn in getattr(m, h, {}).items()) for h in _HOOKS)
    own_forward = id(m.__dict__["forward"]) if "forward" in m.__dict__ else None
    return (name, type(m), type(m).forward, own_forward, m.training, attrs, hooks)


def _state(v, depth: int, seen: dict):
    """A comparable summary of attribute value v: plain values as they are, containers and
    objects with a __dict__ by their contents down to `depth`, anything else (functions,
    tensors and modules, which are guarded on their own) by type and identity. `seen`
    memoizes objects by id (a config object shared by every layer is summed up once)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (torch.Tensor, torch.nn.Module)) or callable(v) or depth == 0:
        return (type(v), id(v))
    if id(v) in seen:
        return seen[id(v)]
    if isinstance(v, (tuple, list, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        out = (type(v), tuple(_state(x, depth - 1, seen) for x in items))
    elif isinstance(v, dict):
        out = (dict, tuple(sorted(((repr(k), _state(x, depth - 1, seen)) for k, x in v.items()),
                                  key=lambda kv: kv[0])))
    elif hasattr(v, "__dict__"):
        out = (type(v), _state(vars(v), depth, seen))
    else:
        out = (type(v), id(v))
    seen[id(v)] = out
    return out


def imported(model: torch.nn.Module, key: tuple) -> tuple[Module, str] | None:
    """(the IR imported for `model` under guard `key`, its text), or None. The module is the
    memo's own: a caller that rewrites it must clone it first."""
    found = _memo.get(model)
    if found is None or found[0] != key:
        return None
    return found[1], found[2]


def remember(model: torch.nn.Module, key: tuple, module: Module) -> str:
    """Keep a pristine copy of `module`, imported from `model` under guard `key`; returns its
    text."""
    text = print_module(module)
    _memo[model] = (key, module.clone(text), text)
    return text
