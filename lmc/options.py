"""The one options object of a compile. Environment variables are read only for debug output
(LMC_DUMP_IR), in `lmc.compile`, never deep in the core."""
from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("ref", "cpu")  # "gpu" joins with its backend


@dataclass(frozen=True)
class CompileOptions:
    target: str = "ref"
    pipeline: str | None = None          # None: default_pipeline(options)
    dump_ir: str | None = None           # directory for per-pass dumps
    check_numerics: bool = False         # run the interpreter after every pass and compare
    numerics_rtol: float = 1e-4
    numerics_atol: float = 1e-5
    verify_each: bool = True             # verify after every pass (cheap; keep on)
    threads: int | None = None           # cpu: worker threads per kernel (None: all cores)
    cache_dir: str | None = None         # compile cache (None: $LMC_CACHE_DIR or ~/.cache/lmc;
                                         # "" or "off": no cache)


def default_pipeline(options: CompileOptions) -> list[str]:
    """The compiler, as one list of named passes."""
    return [
        "canonicalize",
        "raise-moe",      # per-expert loops → route / grouped matmul / combine
        "canonicalize",
        "cse",
        "dce",
        *(["raise-attention",  # hand-written softmax(q kᵀ) v → tensor.attention
           "canonicalize",     # ... whose kᵀ permute then cancels
           "widen-lowp",       # bf16/f16 GEMMs and attention compute in f32
           "fuse",             # kernel.fused groups: what the backend compiles
           "dce"] if options.target != "ref" else []),
    ]


def training_pipeline(options: CompileOptions, autodiff: str, optimizer: str) -> list[str]:
    """The pipeline of a train step: the model's own clean-up, then `autodiff` (after attention
    is raised, so that the forward keeps its flash kernel and the backward recomputes the
    probabilities), the optimizer's update, and the target's fusion over the whole step."""
    native = options.target != "ref"
    return [
        "canonicalize", "raise-moe", "canonicalize", "cse", "dce",
        *(["raise-attention", "canonicalize"] if native else []),
        autodiff, optimizer,
        "canonicalize", "cse", "dce",
        *(["widen-lowp", "fuse", "dce"] if native else []),
    ]
