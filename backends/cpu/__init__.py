"""lmc CPU backend: LLVM IR text rendered by lmc, JIT-compiled with llvmlite for the host CPU."""
from .gemm import ColumnBias, EpilogueOp, GemmConfig, Relu, compile_gemm, default_config
from .jit import JitEngine, default_engine, host_target
from .threads import sgemm

__all__ = ["ColumnBias", "EpilogueOp", "GemmConfig", "JitEngine", "Relu", "compile_gemm",
           "default_config", "default_engine", "host_target", "sgemm"]
