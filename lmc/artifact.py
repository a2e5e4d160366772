"""Artifacts: a compiled model as one self-describing zip file (DESIGN.md §5), never pickle.

Entries (stored, not deflated: object code and weights do not shrink, and reads stay cheap):
`manifest.json` (versions, target CPU, signature, pipeline, output pytree spec, kernels, the
sha256 of every other entry), `ir.lmc` (the final IR), `kernels/<key>.ll` and `kernels/<key>.o`
(LLVM text and object code of each kernel, by the JIT's content key) and `weights.safetensors`.
`load` checks the manifest and every hash before it uses anything, then registers the object
code with the JIT engine, so building the executable compiles nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import lmc
from lmc.errors import ArtifactError, LmcError
from lmc.ir.core import Module
from lmc.ir.printer import print_module
from lmc.options import CompileOptions, default_pipeline

FORMAT = "lmc-artifact/1"
MANIFEST, IR, WEIGHTS = "manifest.json", "ir.lmc", "weights.safetensors"
_TEXT_IR = re.compile(r"^\s*func\s+@", re.M)


# ---- saving --------------------------------------------------------------------------------------

def save(cm, path: str | Path, weights_from: dict[str, np.ndarray] | None = None) -> Path:
    """Write compiled model `cm` to `path` (atomically: a reader never sees half a file).
    `weights_from` (the compile cache's entries): the weights that are these very arrays are
    not written, only named (`weights.from_model` in the manifest), and `Artifact.module`
    takes them from the caller. The cache key hashes those bytes, and passes replace arrays,
    never mutate them, so a hit has them already: storing them again cost a cold compile
    ~0.1 s for 13 MB here, and a large model would have filled the cache with copies."""
    path = Path(path)
    entries: dict[str, bytes] = {IR: print_module(cm.module).encode()}
    external = sorted(name for name, arr in cm.module.params.items()
                      if weights_from is not None and weights_from.get(name) is arr)
    weights, bf16 = _weights_bytes(cm.module, set(external))
    entries[WEIGHTS] = weights
    kernels = []
    for km in cm.executable.kernel_modules() if cm.executable is not None else []:
        entries[f"kernels/{km.key}.ll"] = km.llvm_ir.encode()
        entries[f"kernels/{km.key}.o"] = km.object_code
        kernels.append({"key": km.key, "name": km.name, "ir_bytes": len(km.llvm_ir),
                        "object_bytes": len(km.object_code)})
    manifest = _manifest(cm, kernels, bf16)
    if external:
        manifest["weights"]["from_model"] = external
    manifest["files"] = {name: _sha256(data) for name, data in entries.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            entries = {MANIFEST: json.dumps(manifest, indent=1, sort_keys=True).encode()
                       } | entries
            for name, data in entries.items():  # fixed dates: the same model, the same bytes
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _manifest(cm, kernels: list[dict], bf16: list[str]) -> dict:
    """Everything `load` and `lmc inspect` need to know before reading any other entry."""
    func, opts = cm.module.main, cm.options
    manifest = {
        "format": FORMAT, "lmc_version": lmc.__version__, "target": opts.target,
        "pipeline": opts.pipeline if opts.pipeline is not None else ",".join(
            default_pipeline(opts)),
        "inputs": [{"name": a.name, "type": str(a.type)} for a in func.inputs],
        "outputs": [{"name": f"output{i}", "type": str(t)}
                    for i, t in enumerate(func.result_types)],
        "out_spec": _out_spec(cm.module),
        "kernels": kernels,
        "weights": {"count": len(cm.module.params), "bf16": bf16,
                    "bytes": int(sum(a.nbytes for a in cm.module.params.values()))},
    }
    if cm.executable is not None:
        from lmc.backends.cpu.jit import default_engine, llvm_version
        engine = default_engine(cm.executable.target)
        manifest["cpu"] = {"name": engine.target.cpu, "features": engine.target.features,
                           "triple": engine.target_machine.triple,
                           "opt_level": engine.opt_level, "llvm": llvm_version()}
    return manifest


def _out_spec(module: Module) -> str | None:
    """The torch output pytree spec as JSON text (treespec_dumps), so outputs keep their shape."""
    spec = module.meta.get("torch_out_spec")
    if spec is None:
        return None
    from torch.utils import _pytree
    try:
        return _pytree.treespec_dumps(spec)
    # torch raises NotImplementedError for a pytree node type it cannot serialize
    except (NotImplementedError, TypeError, ValueError) as exc:
        warnings.warn(f"lmc: the model's output structure cannot be saved ({exc}); the loaded "
                      "model returns its outputs as a flat tuple", stacklevel=3)
        return None


def _weights_bytes(module: Module, leave_out: set[str]) -> tuple[bytes, list[str]]:
    """safetensors bytes of the params but `leave_out`; bf16 travels as its uint16 bits
    (safetensors' numpy reader has no bf16), named in the manifest so that load views it back."""
    from safetensors.numpy import save as st_save
    arrays, bf16 = {}, []
    for name, arr in module.params.items():
        if name in leave_out:
            continue
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if arr.dtype.name == "bfloat16":
            arr, bf16 = arr.view(np.uint16), [*bf16, name]
        arrays[name] = arr
    return st_save(arrays), bf16


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- loading -------------------------------------------------------------------------------------

@dataclass
class Artifact:
    """An artifact file read into memory: its manifest and entries (checked by `verify`)."""

    path: Path
    manifest: dict
    entries: dict[str, bytes]

    def verify(self, hashes: bool = True) -> None:
        """Every entry is listed with its sha256 in the manifest, and (`hashes`) matches it."""
        files = self.manifest.get("files")
        if not isinstance(files, dict):
            raise ArtifactError(f"{self.path}: corrupt artifact: the manifest lists no files")
        for name in (IR, WEIGHTS):
            if name not in files:
                raise ArtifactError(f"{self.path}: corrupt artifact: missing entry '{name}'")
        for name, digest in files.items():
            if name not in self.entries:
                raise ArtifactError(f"{self.path}: corrupt artifact: missing entry '{name}'")
            if hashes and _sha256(self.entries[name]) != digest:
                raise ArtifactError(f"{self.path}: tampered artifact: entry '{name}' does not "
                                    "match the sha256 the manifest records for it")
        for name in self.entries:
            if name not in files:
                raise ArtifactError(f"{self.path}: tampered artifact: entry '{name}' is not "
                                    "listed in the manifest")
        for k in self.manifest.get("kernels", []):
            for ext in ("ll", "o"):
                if f"kernels/{k['key']}.{ext}" not in files:
                    raise ArtifactError(f"{self.path}: corrupt artifact: missing entry "
                                        f"'kernels/{k['key']}.{ext}'")

    def check_version(self) -> None:
        """The IR text and kernel ABIs are those of one lmc version: refuse any other."""
        made_by = self.manifest.get("lmc_version")
        if made_by != lmc.__version__:
            raise ArtifactError(f"{self.path} was made by lmc {made_by}; this is lmc "
                                f"{lmc.__version__}. Artifacts load only in the lmc version "
                                "that made them: compile the model again with this lmc")

    def problems_on_this_cpu(self) -> list[str]:
        """Why this machine cannot run the stored object code (empty: it can)."""
        cpu = self.manifest.get("cpu")
        if cpu is None:
            return []
        from lmc.backends.cpu.jit import HostTarget, default_engine, host_target, llvm_version
        host, made_for = host_target(), HostTarget(cpu["name"], cpu["features"])
        problems = []
        arch, here = cpu["triple"].split("-")[0], default_engine().target_machine.triple
        if arch != here.split("-")[0]:
            problems.append(f"the code is for {cpu['triple']}, this machine is {here}")
        missing = sorted(made_for.enabled() - host.enabled())
        if missing:
            problems.append(f"the code was compiled for a {cpu['name']} CPU with feature(s) "
                            f"this {host.cpu} CPU lacks: {', '.join(missing)}")
        if cpu["llvm"] != llvm_version():
            problems.append(f"the code was compiled with {cpu['llvm']}, this lmc uses "
                            f"{llvm_version()}")
        return problems

    def check_cpu(self) -> None:
        """ArtifactError (suggesting recompile=True) unless this machine runs the code."""
        problems = self.problems_on_this_cpu()
        if problems:
            raise ArtifactError(f"{self.path}: {'; '.join(problems)}. Use lmc.load(path, "
                                "recompile=True) to rebuild the kernels for this machine")

    def module(self, model_params: dict[str, np.ndarray] | None = None) -> Module:
        """The final IR with its weights (bf16 arrays viewed back from their uint16 bits);
        those the entry names as the model's own come from `model_params`."""
        from safetensors.numpy import load as st_load

        from lmc.ir.parser import parse
        params = st_load(self.entries[WEIGHTS])
        for name in self.manifest.get("weights", {}).get("bf16", []):
            import ml_dtypes
            params[name] = params[name].view(ml_dtypes.bfloat16)
        params |= self._model_weights(model_params)
        try:
            return parse(self.entries[IR].decode(), params=params, source=f"{self.path}:{IR}")
        except LmcError as exc:  # hashes matched, so the writer made IR this lmc cannot read
            raise ArtifactError(f"{self.path}: the stored IR does not load: {exc}") from exc

    def _model_weights(self, model_params: dict[str, np.ndarray] | None) -> dict:
        names = self.manifest.get("weights", {}).get("from_model", [])
        if names and model_params is None:
            raise ArtifactError(f"{self.path} is a compile-cache entry: its weights are the "
                                "model's own and are not in the file. Compile the model "
                                "(lmc.compile) to use it, or save an artifact with cm.save")
        missing = [n for n in names if n not in model_params]
        if missing:
            raise ArtifactError(f"{self.path}: the model has no weight(s) "
                                f"{', '.join(missing[:5])} that this cache entry takes from it")
        return {n: model_params[n] for n in names}

    def out_spec(self):
        """The saved output pytree spec. A node type registers itself with pytree when its
        module is imported (e.g. transformers' ModelOutput classes): import those first."""
        text = self.manifest.get("out_spec")
        if text is None:
            return None
        import contextlib
        import importlib

        from torch.utils import _pytree
        for name in set(re.findall(r'"type": "([\w.]+)\.\w+"', text)) - {"builtins"}:
            with contextlib.suppress(ImportError):  # then treespec_loads names the type
                importlib.import_module(name)
        try:
            return _pytree.treespec_loads(text)
        # NotImplementedError: torch's answer for a node type not registered in this process
        except (NotImplementedError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: cannot rebuild the model's output structure: "
                                f"{exc}") from None

    def build(self, options: CompileOptions, meta: dict | None = None,
              recompile: bool = False, model_params: dict[str, np.ndarray] | None = None):
        """The CompiledModel: object code registered with the JIT first (recompile: none, the
        kernels are rendered and compiled from the IR for this machine); `model_params`: the
        weights a compile-cache entry takes from the model (`save`'s `weights_from`)."""
        from lmc.compile import CompiledModel
        module = self.module(model_params)
        if meta is not None:
            module.meta = dict(meta)
        elif self.manifest.get("out_spec") is not None:
            module.meta["torch_out_spec"] = self.out_spec()
        executable = None
        if options.target == "cpu":
            from lmc.backends.cpu.runtime import CpuExecutable
            target = None if recompile else self._register_kernels()
            executable = CpuExecutable(module, target=target, threads=options.threads)
        return CompiledModel(module, {"optimized": self.entries[IR].decode()}, options,
                             executable=executable)

    def _register_kernels(self):
        """Hand the object code to the engine of the CPU it was compiled for (the host's own
        engine when that is this CPU); returns that engine's target (None: the host)."""
        from lmc.backends.cpu.jit import HostTarget, default_engine, host_target
        cpu = self.manifest["cpu"]
        target: HostTarget | None = HostTarget(cpu["name"], cpu["features"])
        if target == host_target():
            target = None
        default_engine(target).register_objects(
            {k["key"]: self.entries[f"kernels/{k['key']}.o"] for k in self.manifest["kernels"]})
        return target


def read(path: str | Path) -> Artifact:
    """Read an artifact file: ArtifactError if it is not one, truncated, or lacks its manifest
    (the entry hashes are checked by `Artifact.verify`)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror}") from None
    if not head.startswith(b"PK\x03\x04"):
        if _looks_like_text_ir(head):
            raise ArtifactError(f"{path} is lmc text IR, not an artifact; compile it first: "
                                f"lmc compile {path} -o OUT")
        raise ArtifactError(f"{path}: corrupt artifact: not a zip archive")
    try:
        with zipfile.ZipFile(path) as zf:
            entries = {info.filename: zf.read(info) for info in zf.infolist()}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: corrupt artifact (truncated or damaged): {exc}") from None
    if MANIFEST not in entries:
        raise ArtifactError(f"{path}: corrupt artifact: missing entry '{MANIFEST}'")
    try:
        manifest = json.loads(entries.pop(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt artifact: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an lmc artifact (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None}"
                            f", expected {FORMAT})")
    return Artifact(path, manifest, entries)


def _looks_like_text_ir(head: bytes) -> bool:
    try:
        return _TEXT_IR.search(head.decode("utf-8", errors="strict")) is not None
    except UnicodeDecodeError:
        return False


def open_artifact(path: str | Path, recompile: bool = False, hashes: bool = True) -> Artifact:
    """Read and check an artifact: version, every hash (`hashes`: the compile cache reads its
    own files, whose damage the zip's CRC-32 of every entry already catches, without), and
    (unless recompiling) that this machine can run its object code."""
    art = read(path)
    try:
        art.check_version()
        art.verify(hashes)
        if not recompile:
            art.check_cpu()
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{art.path}: corrupt artifact: a manifest field is missing or "
                            f"malformed ({type(exc).__name__}: {exc})") from None
    return art


def load(path: str | Path, *, recompile: bool = False, threads: int | None = None):
    """A CompiledModel from an artifact, ready to call like the model that was saved.

    recompile=True rebuilds the kernels from the IR for this machine (an artifact made on a CPU
    with features this one lacks, or with another LLVM)."""
    art = open_artifact(path, recompile)
    m = art.manifest
    options = CompileOptions(target=m.get("target", "ref"), pipeline=m.get("pipeline"),
                             threads=threads)
    return art.build(options, recompile=recompile)
