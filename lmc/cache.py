"""The compile cache: a second `lmc.compile` of the same model is served from an artifact.

The key is a content hash of everything that decides the compiled code: the imported IR text,
the weight bytes (they change while the IR does not), the code-shaping CompileOptions fields,
the pipeline, lmc's version and source code, the LLVM version and the host CPU. Values are
artifacts (`lmc/artifact.py`) under `<cache_dir>/models/`; the JIT keeps kernel object files
under `<cache_dir>/kernels/`. Least recently used files go once the cache outgrows MAX_BYTES.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import threading
import warnings
from pathlib import Path

import numpy as np

import lmc
from lmc.errors import ArtifactError
from lmc.ir.core import Module
from lmc.options import CompileOptions

MAX_BYTES = 4 << 30  # per folder (models, kernels): past this the oldest files are deleted
# CompileOptions fields that never change the compiled code: all the others are in the key,
# so that a field added later is safe by default.
NOT_IN_KEY = frozenset(["dump_ir", "check_numerics", "numerics_rtol", "numerics_atol",
                        "verify_each", "threads", "cache_dir"])
CACHED_TARGETS = ("cpu",)  # the reference target compiles in a blink: nothing worth storing


def resolve_cache_dir(option: str | None, env: str | None) -> Path | None:
    """CompileOptions.cache_dir, else $LMC_CACHE_DIR, else ~/.cache/lmc; "" or "off": None."""
    value = option if option is not None else env if env is not None else "~/.cache/lmc"
    if value.strip() in ("", "off"):
        return None
    return Path(value).expanduser()


def open_cache(options: CompileOptions, env: str | None) -> ModelCache | None:
    """Point the JIT's kernel cache at the resolved dir, and return the model cache when this
    compile may use it (not for debug runs that dump IR or check numerics after every pass)."""
    root = resolve_cache_dir(options.cache_dir, env)
    if options.target == "cpu":
        from lmc.backends.cpu.jit import set_cache_dir
        set_cache_dir(root / "kernels" if root is not None else None)
    if root is None or options.target not in CACHED_TARGETS or options.dump_ir or \
            options.check_numerics:
        return None
    return ModelCache(root)


def weights_digest(params: dict[str, np.ndarray]) -> str:
    """sha256 of every array's name, dtype, shape and bytes. sha256 rather than blake2b: with
    the SHA instructions of current x86 CPUs it hashes ~1.9 GB/s against blake2b's ~0.8 (the
    GPT block's 12 MB of weights: 7 ms of a 0.1 s warm compile instead of 14)."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.asarray(params[name], order="C")
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
    return h.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """sha256 of lmc's own Python sources: a cache entry made by other compiler code (a
    development checkout between version bumps) must not be served."""
    h = hashlib.sha256()
    for pkg in ("lmc", "lmc.passes", "lmc.backends", "lmc.frontends"):
        spec = importlib.util.find_spec(pkg)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(folder).rglob("*.py")):
                h.update(f"{pkg}/{path.relative_to(folder)}\0".encode())
                h.update(path.read_bytes())
    return h.hexdigest()


class ModelCache:
    """Artifacts by compile key under `<root>/models/`."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"

    def key(self, module: Module, options: CompileOptions, pipeline: str,
            imported_text: str) -> str:
        """sha256 of everything that decides the compiled code (see the module docstring)."""
        from lmc.backends.cpu.jit import host_target, llvm_version
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                  if f.name not in NOT_IN_KEY}
        fields["pipeline"] = pipeline
        target = host_target()
        parts = [lmc.__version__, code_fingerprint(), llvm_version(), target.cpu,
                 target.features, repr(sorted(fields.items())), imported_text,
                 weights_digest(module.params)]
        h = hashlib.sha256()
        for part in parts:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.models / f"{key}.lmca"

    def load(self, key: str, imported: Module, options: CompileOptions, imported_text: str):
        """The cached CompiledModel for `key`, or None. It takes the caller's options (threads)
        and the imported module's meta (the torch output structure) and text; a damaged entry
        is deleted and counts as a miss."""
        from lmc.artifact import open_artifact
        path = self.path(key)
        if not path.exists():
            return None
        try:
            cm = open_artifact(path, hashes=False).build(options, meta=imported.meta,
                                                         model_params=imported.params)
        except ArtifactError as exc:
            warnings.warn(f"lmc: dropping a bad compile cache entry: {exc}", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: evicted last
        cm.artifacts = {"import": imported_text, **cm.artifacts}
        cm.cache_hit = True
        return cm

    def store(self, key: str, cm, model_params: dict[str, np.ndarray]) -> None:
        """Save `cm` under `key`, but for the weights it shares with the imported model's
        `model_params` (which the key hashes), then trim the cache; a failure only warns (it
        is a cache)."""
        from lmc.artifact import save
        try:
            self.models.mkdir(parents=True, exist_ok=True)
            save(cm, self.path(key), weights_from=model_params)
            for folder in (self.models, self.root / "kernels"):
                evict(folder, MAX_BYTES)
        except OSError as exc:
            warnings.warn(f"lmc: cannot write the compile cache in {self.root}: {exc}",
                          stacklevel=3)


_evict_lock = threading.Lock()


def evict(folder: Path, max_bytes: int) -> list[Path]:
    """Delete the least recently modified files of `folder` until it holds ≤ max_bytes."""
    with _evict_lock:
        try:
            files = [(p.stat(), p) for p in folder.iterdir() if p.is_file()]
        except FileNotFoundError:
            return []
        files.sort(key=lambda sp: sp[0].st_mtime_ns)
        total, gone = sum(st.st_size for st, _ in files), []
        for st, p in files:
            if total <= max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= st.st_size
            gone.append(p)
        return gone
