"""One llvmlite MCJIT engine for the host CPU: add LLVM IR text, get ctypes functions back.

Modules are optimized with the new pass manager at O3 for the host's CPU name and features, so
generated vector code uses whatever the machine has (AVX2+FMA, or AVX-512). Functions come back as
`ctypes.CFUNCTYPE` objects, which release the GIL while they run: that is what lets Python threads
run kernels on several cores at once.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

import llvmlite.binding as llvm

from lmc.errors import LmcError


class JitError(LmcError):
    """LLVM rejected generated IR text; the message carries LLVM's diagnostic."""


@dataclass(frozen=True)
class HostTarget:
    """What the host CPU offers, as LLVM names it; decides vector width and kernel shapes."""

    cpu: str
    features: str

    @property
    def has_avx512(self) -> bool:
        return "+avx512f" in self.features.split(",")

    @property
    def has_fma(self) -> bool:
        return "+fma" in self.features.split(",")

    def without_avx512(self, cpu: str = "znver3") -> HostTarget:
        """This CPU as an AVX2-only machine (e.g. CI's Zen 3): for testing that code path here."""
        feats = [f"-{f[1:]}" if f.startswith("+avx512") else f for f in self.features.split(",")]
        return HostTarget(cpu, ",".join(feats))


@dataclass
class CompiledModule:
    """A module added to the engine: its IR text as rendered (kept for artifacts) and optimized."""

    name: str
    llvm_ir: str
    optimized_ir: str
    engine: JitEngine = field(repr=False)

    def function(self, name: str, restype, *argtypes):
        """A CFUNCTYPE callable (GIL released during the call) for function `name`."""
        address = self.engine.function_address(name)
        return ctypes.CFUNCTYPE(restype, *argtypes)(address)


_init_lock = threading.Lock()
_initialized = False


def _initialize_llvm() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()
            _initialized = True


def host_target() -> HostTarget:
    """The host CPU name and feature string, as `llc -mcpu/-mattr` would take them."""
    _initialize_llvm()
    return HostTarget(llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())


class JitEngine:
    """An MCJIT engine for the host. Modules added to it live as long as the engine."""

    def __init__(self, opt_level: int = 3, target: HostTarget | None = None):
        _initialize_llvm()
        self.target = target or host_target()
        llvm_target = llvm.Target.from_triple(llvm.get_process_triple())
        self.target_machine = llvm_target.create_target_machine(
            cpu=self.target.cpu, features=self.target.features, opt=opt_level,
            reloc="default", codemodel="jitdefault")
        self.opt_level = opt_level
        # MCJIT wants an owning module to start from; an empty one does.
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.target_machine)
        self._lock = threading.Lock()
        self.modules: dict[str, CompiledModule] = {}

    def add_ir(self, name: str, llvm_ir: str) -> CompiledModule:
        """Parse, verify, optimize (O3) and machine-compile `llvm_ir`; return its handle."""
        try:
            module = llvm.parse_assembly(llvm_ir)
            module.verify()
        except RuntimeError as exc:
            raise JitError(f"LLVM rejected module '{name}': {exc}") from None
        module.name = name
        module.triple = self.target_machine.triple
        module.data_layout = str(self.target_machine.target_data)
        self._optimize(module)
        with self._lock:
            self._engine.add_module(module)
            self._engine.finalize_object()
            self._engine.run_static_constructors()
        compiled = CompiledModule(name, llvm_ir, str(module), self)
        self.modules[name] = compiled
        return compiled

    def function_address(self, name: str) -> int:
        address = self._engine.get_function_address(name)
        if not address:
            raise JitError(f"no function '{name}' in the JIT engine")
        return address

    def assembly(self, llvm_ir: str) -> str:
        """Host assembly for `llvm_ir` after O3: for reading what the vectorizer made of it."""
        module = llvm.parse_assembly(llvm_ir)
        module.triple = self.target_machine.triple
        self._optimize(module)
        return self.target_machine.emit_assembly(module)

    def _optimize(self, module) -> None:
        pto = llvm.create_pipeline_tuning_options(speed_level=self.opt_level)
        pto.loop_vectorization = True
        pto.slp_vectorization = True
        pto.loop_unrolling = True
        builder = llvm.create_pass_builder(self.target_machine, pto)
        builder.getModulePassManager().run(module, builder)


_engines: dict[HostTarget | None, JitEngine] = {}
_engine_lock = threading.Lock()  # separate from _init_lock: JitEngine() takes that one


def default_engine(target: HostTarget | None = None) -> JitEngine:
    """The process-wide engine for `target` (None: the host), created on first use."""
    with _engine_lock:
        if target not in _engines:
            _engines[target] = JitEngine(target=target)
    return _engines[target]
