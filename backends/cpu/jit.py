"""One llvmlite MCJIT engine per target: add LLVM IR text, get ctypes functions back.

Modules are optimized with the new pass manager at O3 for the target's CPU name and features, so
generated vector code uses whatever the machine has (AVX2+FMA, or AVX-512). Functions come back as
`ctypes.CFUNCTYPE` objects, which release the GIL while they run: that is what lets Python threads
run kernels on several cores at once.

Every module is identified by a content key (its text, the CPU, the LLVM version, the opt level)
and keeps its object code. `add_ir` serves a key from memory, from object code registered by an
artifact, or from an on-disk cache of `<key>.o` files before it compiles anything: a hit loads
the object with `add_object_file` and skips parsing, O3 and codegen.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import re
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from lmc.errors import LmcError

from . import codegen
from .pool import cpu_threads

# Part of every key: bump it when code outside the key (the O3 pipeline options, the target
# machine settings below) changes what object code a text compiles to.
KEY_FORMAT = "lmc-jit-1"


class JitError(LmcError):
    """LLVM rejected generated IR text, or two modules define one symbol with different code."""


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

    def enabled(self) -> set[str]:
        """The features this target turns on (`+name` in the feature string), without the `+`."""
        return {f[1:] for f in self.features.split(",") if f.startswith("+")}


@dataclass
class CompiledModule:
    """A module added to an engine: its IR text as rendered, its content key and object code.

    `source` says where the machine code came from: "compiled", "registered" (an artifact's
    object code) or "disk" (the engine's cache directory)."""

    name: str
    llvm_ir: str
    key: str
    object_code: bytes = field(repr=False)
    symbols: tuple[str, ...] = field(repr=False)  # the functions and globals it exports
    source: str
    engine: JitEngine = field(repr=False)
    _optimized_ir: str | None = field(default=None, repr=False)

    @property
    def optimized_ir(self) -> str:
        """The module after O3 (recomputed, without codegen, for modules loaded as objects)."""
        if self._optimized_ir is None:
            self._optimized_ir = self.engine.optimize_text(self.name, self.llvm_ir)
        return self._optimized_ir

    def function(self, name: str, restype, *argtypes):
        """A CFUNCTYPE callable (GIL released during the call) for function `name`."""
        address = self.engine.function_address(name)
        return ctypes.CFUNCTYPE(restype, *argtypes)(address)


_init_lock = threading.Lock()
# Helper processes compiling at once (`JitEngine.start_helpers`), and the threads a build
# compiles its kernels on: one per core, at least two, at most four (a model's kernels rarely
# keep more busy).
COMPILE_WORKERS = min(4, max(2, cpu_threads()))
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


def spin_pause() -> tuple[str, str]:
    """(declaration, instruction) of a spin-wait hint for this machine's LLVM IR: x86's PAUSE
    (it spares the core's sibling and the memory order machine while a thread polls)."""
    if llvm.get_process_triple().startswith(("x86_64", "i686")):
        return "declare void @llvm.x86.sse2.pause()\n", "call void @llvm.x86.sse2.pause()"
    return "", "fence seq_cst"


def llvm_version() -> str:
    """llvmlite and LLVM versions, e.g. "llvmlite 0.50.0, LLVM 22.1.0": both shape object code."""
    return (f"llvmlite {llvmlite.__version__}, LLVM "
            f"{'.'.join(map(str, llvm.llvm_version_info))}")


# A module whose text starts with this line is vectorized by hand (explicit vector types, its
# loops unrolled by the renderer): O3 without LLVM's loop vectorizer, SLP vectorizer and loop
# unroller, which found nothing to gain in the attention kernel and took 40 % of its ~1 s
# compile (the line is part of the text, so of the module's cache key too).
HAND_VECTORIZED = "; lmc: hand-vectorized (no LLVM loop/SLP vectorizer, no unroller)"


def _vectorize(llvm_ir: str) -> bool:
    return not llvm_ir.startswith(HAND_VECTORIZED)


def module_key(llvm_ir: str, target: HostTarget, opt_level: int) -> str:
    """sha256 of everything that decides a module's object code."""
    h = hashlib.sha256()
    for part in (KEY_FORMAT, target.cpu, target.features, llvm_version(), str(opt_level)):
        h.update(part.encode())
        h.update(b"\0")
    h.update(llvm_ir.encode())
    return h.hexdigest()


_NAME = r'("(?:[^"\\]|\\.)*"|[-\w$.]+)'
_DEFINE = re.compile(rf"define\s([^@\n]*)@{_NAME}")
_GLOBAL = re.compile(rf"@{_NAME}\s*=\s*([^\n]*)")
_NOT_EXPORTED = {"internal", "private", "external", "extern_weak"}


def _line_starts(text: str, prefix: str):
    """Offsets of the lines of `text` that begin with `prefix` (str.find: C speed)."""
    if text.startswith(prefix):
        yield 0
    at = text.find("\n" + prefix)
    while at >= 0:
        yield at + 1
        at = text.find("\n" + prefix, at + 1)


def exported_symbols(llvm_ir: str) -> tuple[str, ...]:
    """Functions and globals a module exports: what would clash with another module's
    definitions in one engine. Found by scanning the text, so that a cache hit needs no parse."""
    out = []
    for at in _line_starts(llvm_ir, "define"):
        m = _DEFINE.match(llvm_ir, at)
        if m and _NOT_EXPORTED.isdisjoint(m.group(1).split()):
            out.append(m.group(2))
    for at in _line_starts(llvm_ir, "@"):
        m = _GLOBAL.match(llvm_ir, at)
        words = m.group(2).split() if m else []
        if words and words[0] not in _NOT_EXPORTED:
            out.append(m.group(1))
    return tuple(name.strip('"') for name in out)


class JitEngine:
    """An MCJIT engine for one target. Modules added to it live as long as the engine.

    `cache_dir` (None: no disk cache) holds `<key>.o` object files and `<key>.o.sha256` checks;
    `stats` counts how each `add_ir` was served (the tests count compiles with it)."""

    def __init__(self, opt_level: int = 3, target: HostTarget | None = None,
                 cache_dir: str | Path | None = None):
        _initialize_llvm()
        self.target = target or host_target()
        self.target_machine = codegen.target_machine(self.target.cpu, self.target.features,
                                                     opt_level)
        self.opt_level = opt_level
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # MCJIT wants an owning module to start from; an empty one does.
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.target_machine)
        self._tls = threading.local()  # a target machine per compiling thread
        self._lock = threading.RLock()
        self.modules: dict[str, CompiledModule] = {}   # by module name (the latest of a name)
        self.by_key: dict[str, CompiledModule] = {}
        self._registered: dict[str, bytes] = {}
        self._symbols: dict[str, CompiledModule] = {}  # exported symbol → its module
        self.stats = {"compiled": 0, "memory": 0, "registered": 0, "disk": 0}
        self._helpers: codegen.CodegenHelpers | None = None

    def key(self, llvm_ir: str) -> str:
        """The content key of `llvm_ir` compiled by this engine."""
        return module_key(llvm_ir, self.target, self.opt_level)

    def register_objects(self, objects: Mapping[str, bytes]) -> None:
        """Object code by module key (an artifact's, already checked): `add_ir` of a text with
        one of these keys loads the object instead of compiling."""
        with self._lock:
            self._registered.update(objects)

    def add_ir(self, name: str, llvm_ir: str) -> CompiledModule:
        """The module for `llvm_ir`: from memory, registered objects, the disk cache, or else
        parsed, verified, optimized (O3) and machine-compiled (then stored in the cache).

        Thread-safe. The compile itself runs outside the engine lock; llvmlite serializes every
        LLVM call of a process, so threads compile in parallel only once helper processes are
        started (`start_helpers`)."""
        return self.add_irs([(name, llvm_ir)])[0]

    def add_irs(self, modules: list[tuple[str, str]]) -> list[CompiledModule]:
        """`add_ir` of several (name, text) modules, loaded in order, so that a module may call
        the exported functions of those before it (MCJIT resolves them as it loads it); with
        helper processes, the ones to compile compile side by side."""
        if self._helpers is not None and len(modules) > 1:
            with ThreadPoolExecutor(len(modules), thread_name_prefix="lmc-jit") as workers:
                objects = list(workers.map(lambda m: self._object_code(*m), modules))
        else:
            objects = [self._object_code(*m) for m in modules]
        return [self._add(name, text, *found) for (name, text), found in zip(modules, objects)]

    def _object_code(self, name: str, llvm_ir: str) -> tuple[str, bytes | None, str, str | None]:
        """(key, object code, its source, the optimized text or None); no object code when the
        module is loaded already."""
        key = self.key(llvm_ir)
        with self._lock:
            if key in self.by_key:
                return key, None, "memory", None
            self._check_symbols(name, exported_symbols(llvm_ir))
            obj, source = self._registered.get(key), "registered"
            if obj is None:
                obj, source = self._read_cache(key), "disk"
        if obj is not None:
            return key, obj, source, None
        obj, optimized = self._codegen(name, llvm_ir)
        return key, obj, "compiled", optimized

    def _add(self, name: str, llvm_ir: str, key: str, obj: bytes | None, source: str,
             optimized: str | None) -> CompiledModule:
        """The loaded module of `key`, or `obj` loaded now (compiled object code then goes to
        the disk cache)."""
        with self._lock:
            if key in self.by_key:  # loaded before, or by another thread meanwhile
                self.stats["memory"] += source == "memory"
                return self.by_key[key]
            if source == "registered":
                del self._registered[key]
            compiled = self._load(name, llvm_ir, key, obj, source, optimized)
        if source == "compiled":
            self._write_cache(key, obj)
        return compiled
    def _load(self, name: str, llvm_ir: str, key: str, obj: bytes, source: str,
              optimized: str | None = None) -> CompiledModule:
        symbols = exported_symbols(llvm_ir)
        self._check_symbols(name, symbols)
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self._engine.finalize_object()
        compiled = CompiledModule(name, llvm_ir, key, obj, symbols, source, self, optimized)
        self.stats[source] += 1
        self.modules[name] = self.by_key[key] = compiled
        self._symbols.update(dict.fromkeys(symbols, compiled))
        return compiled

    def start_helpers(self, count: int = 0) -> None:
        """Start helper processes that compile for this engine (codegen.py) up to `count` (0:
        COMPILE_WORKERS): from then on every compile runs on one of them."""
        with self._lock:
            if self._helpers is None:
                self._helpers = codegen.CodegenHelpers(self.target.cpu, self.target.features,
                                                       self.opt_level)
                atexit.register(self._helpers.close)
        self._helpers.ensure(count or COMPILE_WORKERS)

    def _codegen(self, name: str, llvm_ir: str) -> tuple[bytes, str | None]:
        """(object code, the optimized text or None): by a helper process if started, else (or
        if the helper could not) in this process."""
        if self._helpers is not None:
            obj = self._helpers.compile(name, llvm_ir, _vectorize(llvm_ir))
            if obj is not None:
                return obj, None  # the optimized text is recomputed if asked for
        machine = self._thread_machine()
        module = self._parse(name, llvm_ir)
        self._optimize(module, machine, _vectorize(llvm_ir))
        return machine.emit_object(module), str(module)

    def _thread_machine(self):
        tm = getattr(self._tls, "machine", None)
        if tm is None:
            tm = self._tls.machine = codegen.target_machine(self.target.cpu,
                                                            self.target.features, self.opt_level)
        return tm

    def _check_symbols(self, name: str, symbols: tuple[str, ...]) -> None:
        """Modules are unique by content, so a name another module exports is a second
        definition: MCJIT would silently resolve every use to one of them."""
        for sym in symbols:
            other = self._symbols.get(sym)
            if other is not None:
                raise JitError(f"module '{name}' defines '{sym}', which module '{other.name}' "
                               "already defines with different code; one engine resolves a "
                               "name to one definition, so generated names must be unique")

    def _parse(self, name: str, llvm_ir: str):
        try:
            return codegen.parse(name, llvm_ir, self.target_machine)
        except RuntimeError as exc:
            raise JitError(f"LLVM rejected module '{name}': {exc}") from None

    # -- the disk cache -----------------------------------------------------------------------

    def _read_cache(self, key: str) -> bytes | None:
        """`<key>.o` if its recorded sha256 matches: a damaged object would crash LLVM."""
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.o"
        try:
            digest = path.with_name(path.name + ".sha256").read_text().strip()
            data = path.read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == digest else None

    def _write_cache(self, key: str, data: bytes) -> None:
        """Object first, then its check (each atomically): a reader sees all or nothing."""
        if self.cache_dir is None:
            return
        path = self.cache_dir / f"{key}.o"
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
            write_atomic(path.with_name(path.name + ".sha256"),
                         hashlib.sha256(data).hexdigest().encode())
        except OSError as exc:  # a cache is an optimization: say so, but keep compiling
            warnings.warn(f"lmc: cannot write the kernel cache {path}: {exc}", stacklevel=3)

    # -- lookups and inspection ---------------------------------------------------------------

    def function_address(self, name: str) -> int:
        address = self._engine.get_function_address(name)
        if not address:
            raise JitError(f"no function '{name}' in the JIT engine")
        return address

    def optimize_text(self, name: str, llvm_ir: str) -> str:
        """`llvm_ir` after O3, as text (no codegen, nothing added to the engine)."""
        module = self._parse(name, llvm_ir)
        self._optimize(module, vectorize=_vectorize(llvm_ir))
        return str(module)

    def assembly(self, llvm_ir: str) -> str:
        """Host assembly for `llvm_ir` after O3: for reading what the vectorizer made of it."""
        module = llvm.parse_assembly(llvm_ir)
        module.triple = self.target_machine.triple
        self._optimize(module, vectorize=_vectorize(llvm_ir))
        return self.target_machine.emit_assembly(module)

    def _optimize(self, module, machine=None, vectorize: bool = True) -> None:
        codegen.optimize(module, machine or self.target_machine, self.opt_level, vectorize)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_engines: dict[HostTarget | None, JitEngine] = {}
_engine_lock = threading.Lock()  # separate from _init_lock: JitEngine() takes that one
_cache_dir: Path | None = None   # of every default engine, now and later


def default_engine(target: HostTarget | None = None) -> JitEngine:
    """The process-wide engine for `target` (None: the host), created on first use."""
    with _engine_lock:
        if target not in _engines:
            _engines[target] = JitEngine(target=target, cache_dir=_cache_dir)
    return _engines[target]


def set_cache_dir(path: str | Path | None) -> None:
    """Point every default engine (those made so far and later ones) at one kernel cache
    directory; None turns the disk cache off. `lmc.compile` calls this with its cache dir."""
    global _cache_dir
    with _engine_lock:
        _cache_dir = Path(path) if path else None
        for engine in _engines.values():
            engine.cache_dir = _cache_dir
