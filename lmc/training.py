"""`lmc.compile_training`: a torch model (+ loss) → one compiled train step (DESIGN.md §6).

The model and its loss are traced by torch.export into one function; `autodiff` appends the
backward, `optimizer-step` the update; the ordinary pipeline fuses the whole step and the
target compiles it. The trainer keeps the weights and optimizer state as numpy arrays in the
module (`module.params`), feeds each step its learning rate, and swaps in the arrays the step
returns. The arrays a step replaced are the next step's output buffers (double buffering: the
weights and state of the step before last are dead), so a step allocates no fresh megabytes:
those cost a page fault per 4 KB on every step (about 2 % of the tiny GPT's step).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import replace
from typing import Any

import numpy as np

from lmc.errors import LmcError
from lmc.ir.core import Module
from lmc.ir.printer import print_module
from lmc.options import TARGETS, CompileOptions, training_pipeline
from lmc.pass_manager import PassManager

MODEL_PREFIX = "model."  # the wrapper's attribute: stripped so that names match the model's


def compile_training(model, example_inputs, *, loss_fn=None, optimizer=None,
                     target: str = "cpu", dynamic_shapes=None, dump_ir: str | None = None,
                     checkpoint: str = "none", num_targets: int | None = None,
                     options: CompileOptions | None = None) -> Trainer:
    """Compile forward, loss, backward and optimizer update of `model` into one step.

    `example_inputs` is one batch as `step` takes it: the model's inputs, then the targets that
    `loss_fn(output, *targets)` takes (their number is read from loss_fn's signature, or given
    as `num_targets`). With no loss_fn the model's output 0 is the loss. Parameters with
    requires_grad=False stay frozen. `checkpoint` (none | cheap | blocks) recomputes activations in
    the backward instead of keeping them (see `trainer.peak_bytes`). `dynamic_shapes`: a tuple
    over the batch (as torch.export takes it), or a dict keyed by the model's argument names."""
    import torch

    from lmc import optim
    from lmc.compile import _as_tuple, _unalias, prefetch
    from lmc.frontends.torch import import_module

    start = time.perf_counter()
    opts = replace(options or CompileOptions(), target=target, dump_ir=dump_ir)
    if opts.target not in TARGETS:
        raise LmcError(f"target '{opts.target}' is not available; available: {', '.join(TARGETS)}")
    if not isinstance(model, torch.nn.Module):
        raise LmcError(f"compile_training takes a torch.nn.Module, got {type(model).__name__}")
    optimizer = optimizer if optimizer is not None else optim.AdamW()
    if not isinstance(optimizer, optim.Optimizer):
        raise LmcError(f"optimizer must be an lmc.optim optimizer (SGD, HeavyBall, EMAMomentum, "
                       f"Adam, AdamW), got {type(optimizer).__name__}")
    batch = _unalias(_as_tuple(example_inputs))
    traced = model if loss_fn is None else with_loss(
        model, loss_fn, len(batch) - _count_targets(loss_fn, num_targets))
    prefetch(opts)
    module = import_module(traced, batch, _positional(dynamic_shapes, model, batch))
    if loss_fn is not None:
        _strip_prefix(module)
    pipeline = training_pipeline(opts, f"autodiff{{checkpoint={checkpoint}}}",
                                 optimizer.pass_spec())
    pm = PassManager.from_pipeline(",".join(pipeline), dump_ir=opts.dump_ir,
                                   verify_each=opts.verify_each)
    pm.run(module)
    trainer = Trainer(module, opts, optimizer, model, pm)
    trainer.compile_seconds = time.perf_counter() - start
    return trainer


def with_loss(model, loss_fn, num_inputs: int):
    """The module torch.export traces: `loss_fn(model(*inputs), *targets)` (defined here, not
    at import, so that `import lmc` does not import torch)."""
    import torch

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *batch):
            return loss_fn(self.model(*batch[:num_inputs]), *batch[num_inputs:])
    return WithLoss()


def _count_targets(loss_fn, given: int | None) -> int:
    if given is not None:
        return given
    try:
        params = list(inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):
        raise LmcError("cannot read the signature of loss_fn; pass num_targets= (how many of "
                       "the batch's trailing tensors are loss targets)") from None
    required = [p for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or not required:
        raise LmcError("loss_fn must take (output, *targets) as named positional arguments; or "
                       "pass num_targets=")
    return len(required) - 1


def _positional(dynamic_shapes, model, batch):
    """The wrapper's forward takes *batch: give torch.export its dynamic shapes by position.
    A tuple covers the whole batch (inputs, then targets); a dict keyed by the model's argument
    names covers the inputs, and the targets stay static."""
    if dynamic_shapes is None or isinstance(dynamic_shapes, (list, tuple)):
        return None if dynamic_shapes is None else (tuple(dynamic_shapes),)
    names = list(inspect.signature(model.forward).parameters)[:len(batch)]
    return (tuple([dynamic_shapes.get(n) for n in names] + [None] * (len(batch) - len(names))),)


def _strip_prefix(module: Module) -> None:
    """Name weights and locations as the user's model does, not as the wrapper sees them."""
    for op in module.walk():
        if op.loc.path.startswith(MODEL_PREFIX) or op.loc.path == "model":
            op.loc = replace(op.loc, path=op.loc.path[len(MODEL_PREFIX):])
    renamed = {}
    for a in module.main.body.args:
        if a.name.startswith(MODEL_PREFIX):
            new = a.name[len(MODEL_PREFIX):]
            renamed[a.name] = new
            a.name = new
    module.params = {renamed.get(k, k): v for k, v in module.params.items()}


class Trainer:
    """Runs the compiled train step; owns the weights and optimizer state between steps."""

    def __init__(self, module: Module, options: CompileOptions, optimizer, model,
                 pass_manager: PassManager | None = None):
        self.module, self.options, self.optimizer = module, options, optimizer
        self.func = module.main
        self.pass_records = pass_manager.records if pass_manager else []
        self.steps_done = 0
        self.losses: list[float] = []
        # The weights/state arrays the last step replaced, recycled as the next step's outputs
        # where they were a step's own (not the model's first arrays, not ones a user set).
        self._spare: list[np.ndarray | None] | None = None
        self._mine: list[np.ndarray] = []
        self.compile_seconds = 0.0
        kinds = dict(zip(self.func.body.args, self.func.arg_kinds))
        self.updated = [a.name for a in self.func.body.args if kinds[a] == "param"] + \
                       [a.name for a in self.func.body.args if kinds[a] == "state"]
        self.num_outputs = len(self.func.outputs) - len(self.updated)
        self._torch_state = _state_sources(model, {a.name for a in self.func.weights})
        self.artifacts = {"optimized": print_module(module)}
        self.executable = None
        if options.target == "cpu":
            from lmc.backends.cpu.runtime import CpuExecutable
            self.executable = CpuExecutable(module, threads=options.threads, prepack=False)
            self.artifacts.update(self.executable.artifacts())

    @property
    def signature(self):
        """The batch `step` takes (the step's own lr and step inputs are fed by the trainer)."""
        return [(a.name, a.type) for a in self.func.inputs[:-2]]

    def step(self, *batch) -> float:
        """One forward + backward + update on `batch`; returns the loss."""
        arrays = self._check(batch)  # a bad batch raises before it counts as a step
        return self._finish(self._run(arrays + self._scalars()))

    def profile(self, *batch, steps: int = 3):
        """`steps` real train steps on `batch` (they update the weights, as `step` does), each
        step of the function timed: an `lmc.profile.Profile` of their mean."""
        from lmc.profile import Profile
        if self.executable is None:
            raise LmcError("profile: the reference interpreter has no kernels to time; "
                           "compile the train step for a native target (target='cpu')")
        arrays = self._check(batch)
        profiles = []
        for _ in range(steps):
            prof, outs = self.executable.profile(arrays + self._scalars(), repeat=1,
                                                 into=self._into())
            self._finish(outs)
            profiles.append(prof)
        return Profile.mean(profiles)

    def _scalars(self) -> list[np.ndarray]:
        """The step's trailing inputs %lr and %step, for the next step."""
        step = self.steps_done + 1
        return [np.asarray(v, np.float32) for v in (self.optimizer.lr_at(step), step)]

    def _into(self) -> list[np.ndarray | None] | None:
        """The step's output buffers: none for the model outputs, the spare weights/state."""
        return None if self._spare is None else [None] * self.num_outputs + self._spare

    def _finish(self, outs: list[np.ndarray]) -> float:
        """Take a step's outputs: the new weights and optimizer state, the loss."""
        self.steps_done += 1
        new = outs[self.num_outputs:]
        old = [self.module.params[name] for name in self.updated]
        self._spare = [o if o is mine and o is not x else None
                       for o, mine, x in zip(old, self._mine, new)] if self._mine else None
        for name, x in zip(self.updated, new):
            self.module.params[name] = x
        self._mine = list(new)
        loss = float(outs[0])
        self.losses.append(loss)
        return loss

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.executable is not None:
            return self.executable(arrays, into=self._into())
        from lmc.backends.reference import run_func
        return run_func(self.module, arrays, self.func)

    def _check(self, batch) -> list[np.ndarray]:
        from lmc.compile import check_inputs
        return check_inputs(self.func.inputs[:-2], batch,
                            "the train step takes a batch of {n} tensor(s)")

    def state_dict(self) -> dict[str, Any]:
        """The model's weights as torch tensors, keyed as `model.state_dict()` (tied weights
        under every name they have; buffers and frozen parameters as they were)."""
        from lmc.interop import to_torch
        out = {}
        for key, (name, original) in self._torch_state.items():
            if name is None:
                out[key] = original
            else:
                out[key] = to_torch(np.array(self.module.params[name]))
        return out

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies: the trainer's own arrays are reused as output buffers two steps later."""
        kinds = dict(zip(self.func.body.args, self.func.arg_kinds))
        return {a.name: self.module.params[a.name].copy() for a in self.func.body.args
                if kinds[a] == "state"}

    def update_model(self, model) -> None:
        """Copy the trained weights into `model` (in place, no autograd)."""
        import torch
        with torch.no_grad():
            model.load_state_dict(self.state_dict())

    def peak_bytes(self, *batch) -> dict[str, int]:
        """Bytes of the intermediates live at once during one step on `batch` (weights and
        optimizer state not included), as `lmc.ir.analysis.peak_live_bytes` counts them."""
        from lmc.backends.reference.interpreter import bind_symbols
        from lmc.ir.analysis import peak_live_bytes
        arrays = self._check(batch)
        env = bind_symbols([a.type for a in self.func.inputs[:-2]], arrays)
        return peak_live_bytes(self.func, env)

    @property
    def report(self) -> dict:
        return self.executable.report() if self.executable is not None else {}


def _state_sources(model, lifted: set[str]) -> dict[str, tuple[str | None, Any]]:
    """model.state_dict() key → (the module.params name that holds it, or None; the tensor)."""
    by_storage = {}
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, t in named.items():
        if name in lifted:
            by_storage[t.data_ptr()] = name
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        name = key if key in lifted else by_storage.get(t.data_ptr())
        out[key] = (name, t.detach())
    return out
