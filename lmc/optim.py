"""Optimizers and learning-rate schedules for `lmc.compile_training` (DESIGN.md §6).

Each optimizer is a frozen dataclass of hyper-parameters. It does not run anything itself: it
names the `optimizer-step` pass that writes its update into the train step's IR
(`pass_spec()`), the state slots that update keeps (`slots`), and the learning rate of each
step (`lr_at(step)`), which the caller feeds to the compiled step as its `%lr` input — so a
schedule never needs a recompile.

    opt = lmc.optim.AdamW(lr=3e-4, weight_decay=0.1, max_grad_norm=1.0,
                          schedule=lmc.optim.WarmupCosine(warmup_steps=100, total_steps=5000))
    opt.pass_spec()  # 'optimizer-step{optimizer=adamw,weight_decay=0.1,max_grad_norm=1.0}'
    opt.lr_at(1)     # 3e-06
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmc.errors import LmcError


class OptimizerError(LmcError):
    """An optimizer or schedule got a hyper-parameter outside its valid range."""


def _require(ok: bool, owner: object, message: str) -> None:
    if not ok:
        raise OptimizerError(f"{type(owner).__name__}: {message} (got {owner})")


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup, then cosine decay. For 1-based step t, with W = warmup_steps,
    T = total_steps, r = min_lr_ratio:

        factor(t) = t / W                                   for t <= W
        factor(t) = r + (1 − r) · ½ · (1 + cos(π · p))      p = min((t − W) / (T − W), 1)

    so the lr rises from lr/W to lr over the first W steps, falls to r·lr at step T, and stays
    there after it."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        _require(self.warmup_steps >= 0, self, "warmup_steps must be >= 0")
        _require(self.total_steps >= max(self.warmup_steps, 1), self,
                 "total_steps must be >= warmup_steps and >= 1")
        _require(0.0 <= self.min_lr_ratio <= 1.0, self, "min_lr_ratio must be in [0, 1]")

    def factor(self, step: int) -> float:
        """The multiplier of the base lr at 1-based step `step`."""
        if self.warmup_steps and step <= self.warmup_steps:
            return step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min((step - self.warmup_steps) / decay_steps, 1.0) if decay_steps else 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


@dataclass(frozen=True)
class Optimizer:
    """The options every optimizer has: global-norm gradient clipping and an lr schedule.
    Each subclass declares `lr` as its first field and its own hyper-parameters after it."""

    max_grad_norm: float | None = field(default=None, kw_only=True)
    schedule: WarmupCosine | None = field(default=None, kw_only=True)
    pass_name: ClassVar[str] = ""  # the `optimizer` option of the optimizer-step pass

    def __post_init__(self):
        _require(self.lr >= 0, self, "lr must be >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, self,
                 "max_grad_norm must be > 0, or None for no clipping")
        _require(self.schedule is None or isinstance(self.schedule, WarmupCosine), self,
                 "schedule must be a WarmupCosine or None")
        self.to_pass()  # the pass checks the rest of the ranges, in its own option names

    def pass_options(self) -> dict[str, Any]:
        """The optimizer-specific options of the optimizer-step pass."""
        return {}

    def to_pass(self):
        # Imported here: lmc.passes imports every pass module, which lmc.optim need not pay
        # for (or depend on the import order of) until a pass is asked for.
        from lmc.passes.optimizer import OptimizerStep
        try:
            return OptimizerStep(optimizer=self.pass_name, max_grad_norm=self.max_grad_norm or 0.0,
                                 **self.pass_options())
        except LmcError as exc:  # the pass names the option and the range it wants
            raise OptimizerError(f"invalid {self}: {exc}") from None

    def pass_spec(self) -> str:
        """The pipeline text of this optimizer's update pass, e.g. 'optimizer-step{...}'."""
        return self.to_pass().spec()

    @property
    def slots(self) -> tuple[str, ...]:
        """The state slot names; state arrays are named '<slot>.<param name>'."""
        return self.to_pass().slots

    def lr_at(self, step: int) -> float:
        """The learning rate of 1-based step `step`, schedule applied."""
        if step < 1:
            raise OptimizerError(f"{type(self).__name__}.lr_at: steps count from 1, got {step}")
        return self.lr * (self.schedule.factor(step) if self.schedule else 1.0)


@dataclass(frozen=True)
class SGD(Optimizer):
    """torch.optim.SGD: d = g + wd·p; buf = μ·buf + (1 − dampening)·d (buf = d at step 1);
    d = d + μ·buf if nesterov else buf; p −= lr·d."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    pass_name: ClassVar[str] = "sgd"

    def pass_options(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class HeavyBall(Optimizer):
    """Classical (heavy-ball) momentum: v = μ·v − lr·g; p += v."""

    lr: float
    momentum: float = 0.9
    pass_name: ClassVar[str] = "heavy-ball"

    def pass_options(self) -> dict[str, Any]:
        return {"momentum": self.momentum}


@dataclass(frozen=True)
class EMAMomentum(Optimizer):
    """Momentum as an exponential moving average of gradients: v = β·v + (1 − β)·g;
    p −= lr·v."""

    lr: float
    beta: float = 0.9
    pass_name: ClassVar[str] = "ema-momentum"

    def pass_options(self) -> dict[str, Any]:
        return {"momentum": self.beta}


@dataclass(frozen=True)
class Adam(Optimizer):
    """torch.optim.Adam, bias-corrected; weight_decay is L2 added to the gradient."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    pass_name: ClassVar[str] = "adam"

    def __post_init__(self):
        _require(len(self.betas) == 2, self, "betas must be a pair (beta1, beta2)")
        super().__post_init__()

    def pass_options(self) -> dict[str, Any]:
        return {"beta1": float(self.betas[0]), "beta2": float(self.betas[1]),
                "eps": self.eps, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, p *= 1 − lr·wd before the step."""

    weight_decay: float = 0.01
    pass_name: ClassVar[str] = "adamw"
