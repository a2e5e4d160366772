"""lmc: an MLIR-style compiler for neural networks."""
__version__ = "0.2.0"
from lmc import ir, optim  # noqa: F401
from lmc.artifact import load  # noqa: F401
from lmc.compile import CompiledModel, compile  # noqa: F401
from lmc.errors import (  # noqa: F401
                        ArtifactError,
                        InputError,
                        LmcError,
                        NumericsError,
                        ParseError,
                        PipelineError,
                        ShapeError,
                        UnsupportedOpError,
                        VerificationError,
)
from lmc.ir.parser import parse, parse_file  # noqa: F401
from lmc.options import CompileOptions  # noqa: F401
from lmc.training import Trainer, compile_training  # noqa: F401


def __getattr__(name: str):
    # lmc.losses is torch code: imported on first use, so that `import lmc` needs no torch.
    if name == "losses":
        import lmc.losses
        return lmc.losses
    raise AttributeError(f"module 'lmc' has no attribute {name!r}")
