"""lmc: an MLIR-style compiler for neural networks."""
__version__ = "0.1.0"
from lmc.errors import (LmcError, ParseError, VerificationError, ShapeError,  # noqa: F401
                        UnsupportedOpError, InputError, NumericsError, PipelineError,
                        ArtifactError)
from lmc import ir  # noqa: F401
