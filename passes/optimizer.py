"""optimizer-step: the optimizer update as IR, so a train step compiles forward, backward and
update together (DESIGN.md §6).

Input: `@main(inputs.., params.., buffers..) -> (outputs.., dP1, .., dPn)`, one trailing gradient
per `{param}` argument (what `autodiff` produces). Output: `@main(inputs.., %lr, %step,
params.., buffers.., states..) -> (outputs.., new P1, .., new Pn, new states..)`: `%lr: f32[]` is
this step's learning rate (the caller applies the schedule), `%step: f32[]` counts updates from 1,
and each `{state}` argument is an optimizer slot named `<slot>.<param>`, zeros at first.

Per-element math runs in the parameter's dtype and follows torch.optim's operation order, so
results agree with torch to rounding; scalar math (bias corrections, step sizes, the clipping
coefficient) runs in f64, as torch does it in Python floats.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from lmc.errors import PipelineError
from lmc.ir.builder import Builder
from lmc.ir.core import Func, Location, Module, Op, Value
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import DType, TensorType
from lmc.pass_base import Pass, register_pass

F32, F64 = TensorType((), DType.f32), TensorType((), DType.f64)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6)


class UpdateBuilder(Builder):
    """Emits the update's ops before `func.return`; knows the step's f64 `lr` and `step`."""

    def __init__(self, rw: Rewriter, lr: Value, step: Value, loc: Location):
        super().__init__(rw)
        self.lr, self.step, self.loc = lr, step, loc  # lr, step: f64[]

    def at(self, path: str) -> UpdateBuilder:
        return UpdateBuilder(self.rw, self.lr, self.step, Location(path=path))

    def f64(self, x: float) -> Value:
        return self.rw.constant(float(x), F64, loc=self.loc)

    def in_dtype(self, s: Value, like: Value) -> Value:
        """An f64 scalar cast to `like`'s dtype, to meet it in elementwise math."""
        return self.cast(s, like.dtype)

    def one_minus_pow(self, base: float) -> Value:
        """1 - base**step in f64 (bias correction; f32 would lose 1e-5 of 1 - 0.999)."""
        return self.sub(self.f64(1.0), self.op("tensor.pow", self.f64(base), self.step))

    def lerp(self, a: Value, b: Value, weight: float) -> Value:
        """a + w·(b − a) with the rounding of torch's lerp (the other form for w ≥ 0.5)."""
        diff = self.sub(b, a)
        if abs(weight) < 0.5:
            return self.add(a, self.mul(self.scalar(weight, a), diff))
        return self.sub(b, self.mul(diff, self.scalar(1.0 - weight, a)))


# ---- the update rules: (builder, options, param, grad, states) -> (new param, new states) -----

Update = tuple[Value, list[Value]]


def _sgd(b: UpdateBuilder, o: OptimizerStep, p: Value, g: Value, states: list[Value]) -> Update:
    """torch.optim.SGD: d = g + wd·p; buf = μ·buf + (1−τ)·d (buf = d at step 1);
    d = d + μ·buf (nesterov) or buf; p −= lr·d."""
    d = g if o.weight_decay == 0 else b.add(g, b.mul(b.scalar(o.weight_decay, p), p))
    new_states = []
    if o.momentum != 0:
        (buf,) = states
        buf = b.mul(buf, b.scalar(o.momentum, p))
        damp = b.scalar(1.0 - o.dampening, p)
        if o.dampening != 0:  # torch copies d into the buffer at step 1, undamped; the buffer
            # is zero then, so scaling d by 1 instead of 1−τ gives exactly that copy
            first = b.op("tensor.eq", b.step, b.f64(1.0))
            damp = b.in_dtype(b.op("tensor.where", first, b.f64(1.0), b.f64(1 - o.dampening)), p)
        buf = b.add(buf, b.mul(damp, d))
        new_states = [buf]
        d = b.add(d, b.mul(b.scalar(o.momentum, p), buf)) if o.nesterov else buf
    return b.sub(p, b.mul(b.in_dtype(b.lr, p), d)), new_states


def _heavy_ball(b: UpdateBuilder, o: OptimizerStep, p: Value, g: Value,
                states: list[Value]) -> Update:
    """Classical momentum: v = μ·v − lr·g; p += v."""
    (v,) = states
    v = b.sub(b.mul(b.scalar(o.momentum, p), v), b.mul(b.in_dtype(b.lr, p), g))
    return b.add(p, v), [v]


def _ema_momentum(b: UpdateBuilder, o: OptimizerStep, p: Value, g: Value,
                  states: list[Value]) -> Update:
    """Momentum as an exponential moving average: v = β·v + (1−β)·g; p −= lr·v."""
    (v,) = states
    v = b.add(b.mul(b.scalar(o.momentum, p), v), b.mul(b.scalar(1.0 - o.momentum, p), g))
    return b.sub(p, b.mul(b.in_dtype(b.lr, p), v)), [v]


def _adam(b: UpdateBuilder, o: OptimizerStep, p: Value, g: Value, states: list[Value]) -> Update:
    """torch.optim.Adam / AdamW: m = lerp(m, g, 1−β1); v = β2·v + (1−β2)·g²;
    p −= lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε). Adam adds wd·p to g (L2); AdamW first
    scales p by 1 − lr·wd (decoupled)."""
    m, v = states
    if o.weight_decay != 0 and o.optimizer == "adamw":
        p = b.mul(p, b.in_dtype(b.sub(b.f64(1.0), b.mul(b.lr, b.f64(o.weight_decay))), p))
    elif o.weight_decay != 0:
        g = b.add(g, b.mul(b.scalar(o.weight_decay, p), p))
    m = b.lerp(m, g, 1.0 - o.beta1)
    v = b.add(b.mul(v, b.scalar(o.beta2, p)), b.mul(b.mul(b.scalar(1.0 - o.beta2, p), g), g))
    step_size = b.div(b.lr, b.one_minus_pow(o.beta1))
    bias2_sqrt = b.op("tensor.sqrt", b.one_minus_pow(o.beta2))
    denom = b.add(b.div(b.op("tensor.sqrt", v), b.in_dtype(bias2_sqrt, p)), b.scalar(o.eps, p))
    return b.sub(p, b.mul(b.in_dtype(step_size, p), b.div(m, denom))), [m, v]


@dataclass(frozen=True)
class Rule:
    """One optimizer: its update, its state slots, and the options it reads."""

    update: Callable[[UpdateBuilder, OptimizerStep, Value, Value, list[Value]], Update]
    slots: Callable[[OptimizerStep], tuple[str, ...]]
    options: frozenset[str]


_ADAM_OPTIONS = frozenset({"beta1", "beta2", "eps", "weight_decay"})
OPTIMIZERS: dict[str, Rule] = {
    "sgd": Rule(_sgd, lambda o: ("momentum_buffer",) if o.momentum else (),
                frozenset({"momentum", "dampening", "nesterov", "weight_decay"})),
    "heavy-ball": Rule(_heavy_ball, lambda o: ("velocity",), frozenset({"momentum"})),
    "ema-momentum": Rule(_ema_momentum, lambda o: ("exp_avg",), frozenset({"momentum"})),
    "adam": Rule(_adam, lambda o: ("exp_avg", "exp_avg_sq"), _ADAM_OPTIONS),
    "adamw": Rule(_adam, lambda o: ("exp_avg", "exp_avg_sq"), _ADAM_OPTIONS),
}
_COMMON_OPTIONS = frozenset({"optimizer", "max_grad_norm"})


def clip_by_global_norm(b: UpdateBuilder, grads: list[Value], max_norm: float) -> list[Value]:
    """torch.nn.utils.clip_grad_norm_: g *= min(max_norm / (‖all grads‖₂ + 1e-6), 1)."""
    b = b.at("optimizer-step/clip")
    squares = []
    for g in grads:
        g32 = g if g.dtype in (DType.f32, DType.f64) else b.cast(g, DType.f32)  # no f16 sums
        squares.append(b.cast(b.op("tensor.sum", b.mul(g32, g32)), DType.f64))
    total = b.op("tensor.sqrt", functools.reduce(b.add, squares))
    coef = b.div(b.f64(max_norm), b.add(total, b.f64(CLIP_EPS)))
    coef = b.op("tensor.minimum", coef, b.f64(1.0))
    return [b.mul(g, b.in_dtype(coef, g)) for g in grads]


# ---- the pass ----------------------------------------------------------------------------------

@register_pass
@dataclass(frozen=True)
class OptimizerStep(Pass):
    """Append the optimizer update to @main: trailing gradients in, new params and states out."""

    name = "optimizer-step"
    optimizer: str = "sgd"      # sgd | heavy-ball | ema-momentum | adam | adamw
    momentum: float = 0.0       # μ of sgd and heavy-ball, β of ema-momentum
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0   # L2 (sgd, adam) or decoupled (adamw)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # global-norm clipping; 0 = off

    def __post_init__(self):
        rule = OPTIMIZERS.get(self.optimizer)
        if rule is None:
            self._fail(f"unknown optimizer '{self.optimizer}'; known: {', '.join(OPTIMIZERS)}")
        unused = [f.name for f in fields(self) if getattr(self, f.name) != f.default
                  and f.name not in rule.options | _COMMON_OPTIONS]
        if unused:
            self._fail(f"option(s) {', '.join(unused)} do not apply to optimizer "
                       f"'{self.optimizer}' (it reads {', '.join(sorted(rule.options))})")
        for what, ok in self._limits():
            if not ok:
                self._fail(f"{what}, got {self.spec()}")

    def _limits(self) -> list[tuple[str, bool]]:
        one_bounded = self.optimizer in ("heavy-ball", "ema-momentum")
        return [
            ("momentum must be >= 0" + (" and < 1" if one_bounded else ""),
             self.momentum >= 0 and (self.momentum < 1 or not one_bounded)),
            ("dampening must be in [0, 1]", 0 <= self.dampening <= 1),
            ("nesterov needs momentum > 0 and dampening = 0",
             not self.nesterov or (self.momentum > 0 and self.dampening == 0)),
            ("weight_decay must be >= 0", self.weight_decay >= 0),
            ("beta1 and beta2 must be in [0, 1)", 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1),
            ("eps must be >= 0", self.eps >= 0),
            ("max_grad_norm must be >= 0 (0 turns clipping off)", self.max_grad_norm >= 0),
        ]

    def _fail(self, message: str):
        raise PipelineError(f"pass '{self.name}': {message}")

    @property
    def slots(self) -> tuple[str, ...]:
        """The state slot names of this optimizer, e.g. ('exp_avg', 'exp_avg_sq')."""
        return OPTIMIZERS[self.optimizer].slots(self)

    def run(self, module: Module) -> dict[str, Any]:
        func = module.main
        if "train_step" in module.meta:
            self._fail(f"@{func.name} already holds an optimizer update (meta 'train_step')")
        params = func.args_of_kind("param")
        self._check_params(func, params)
        num_outputs, grads = self._find_grads(module, func, params)
        ret = func.return_op
        rw = Rewriter(func.body, ret)
        lr = func.add_arg(F32, self._free_name(func, "lr"))
        step = func.add_arg(F32, self._free_name(func, "step"))
        loc = Location("optimizer-step")
        b = UpdateBuilder(rw, rw.value("tensor.cast", lr, dtype=DType.f64, loc=loc),
                    rw.value("tensor.cast", step, dtype=DType.f64, loc=loc), loc)
        schedule_after(func.body, list(rw.created), None)  # lr/step casts: first thing
        if self.max_grad_norm:
            grads = clip_by_global_norm(b, grads, self.max_grad_norm)
        states = [[self._add_state(module, func, slot, p) for slot in self.slots]
                  for p in params]
        rule, new_params, new_states = OPTIMIZERS[self.optimizer], [], []
        # As torch.optim skips a parameter whose .grad is None: one the loss does not reach
        # (autodiff gives it a zero gradient) keeps its value and state, no weight decay.
        unreached = set(module.meta.get("autodiff", {}).get("unreached", ()))
        for p, g, s in zip(params, grads, states):
            if p.name in unreached:
                new_params.append(p)
                new_states += s
                continue
            first = len(rw.created)
            new_p, new_s = rule.update(b.at(f"optimizer-step/{p.name}"), self, p, g, s)
            schedule_after(func.body, rw.created[first:], g)
            new_params.append(new_p)
            new_states += new_s
        rw.create("func.return", func.outputs[:num_outputs] + new_params + new_states)
        rw.erase_op(ret)
        state_names = [a.name for row in states for a in row]
        module.meta["train_step"] = {"num_outputs": num_outputs, "optimizer": self.spec(),
                                     "params": [p.name for p in params], "states": state_names}
        return {"optimizer": self.optimizer, "params": len(params), "slots": list(self.slots),
                "state_elements": int(sum(module.params[n].size for n in state_names))}

    def _check_params(self, func: Func, params: list[Value]) -> None:
        if not params:
            self._fail(f"@{func.name} has no {{param}} arguments to update (frozen weights are "
                       "{buffer}s)")
        for p in params:
            if not p.dtype.is_float:
                self._fail(f"{{param}} %{p.name} is {p.type}: only float parameters can be "
                           "trained; make it a {buffer}")

    def _find_grads(self, module: Module, func: Func,
                    params: list[Value]) -> tuple[int, list[Value]]:
        """(number of user outputs, the gradients): autodiff's meta, else the trailing outputs."""
        outs, names = func.outputs, [p.name for p in params]
        meta = module.meta.get("autodiff")
        if meta is not None and list(meta["params"]) != names:
            self._fail(f"meta 'autodiff' lists params {list(meta['params'])}, but @{func.name}'s "
                       f"{{param}} arguments are {names}")
        k = meta["num_outputs"] if meta is not None else len(outs) - len(params)
        grads = outs[k:] if k >= 0 else []
        if len(grads) != len(params) or any(g.type != p.type for g, p in zip(grads, params)):
            want = ", ".join(str(p.type) for p in params)
            got = ", ".join(str(v.type) for v in outs)
            self._fail(f"found no gradients: @{func.name} must end its outputs with one gradient "
                       f"per {{param}} argument ({want}), but returns ({got}); run 'autodiff' "
                       "first")
        return k, grads

    def _free_name(self, func: Func, name: str) -> str:
        if any(a.name == name for a in func.body.args):
            self._fail(f"@{func.name} already has an argument %{name}; rename it, the train "
                       "step adds its own")
        return name

    def _add_state(self, module: Module, func: Func, slot: str, p: Value) -> Value:
        name = self._free_name(func, f"{slot}.{p.name}")
        weight = module.params[p.name]
        module.params[name] = np.zeros(weight.shape, weight.dtype)  # same dtype as the param
        return func.add_arg(p.type, name, "state")


def schedule_after(block, ops: list[Op], grad: Value | None) -> None:
    """Move a parameter's update `ops` (in order) to run as soon as its gradient is complete,
    each just after `grad` or its latest operand: gradients then die one by one during the
    backward instead of all living until its end. Nothing moves before the gradient, so no
    param-sized value is made early and kept through the forward. (With clipping the gradient
    is the clipped one, which waits for the global norm.)"""
    floor = block.index(grad.op) + 1 if grad is not None and grad.op is not None and \
        grad.op.parent is block else 0
    for op in ops:
        block.remove(op)
        at = max([block.index(v.op) + 1 for v in op.operand_values
                  if v.op is not None and v.op.parent is block] + [floor])
        block.insert(at, op)
