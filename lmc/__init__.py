"""lmc: an MLIR-style compiler for neural networks."""
__version__ = "0.1.0"
from lmc.errors import (LmcError, ParseError, VerificationError, ShapeError,  # noqa: F401
                        UnsupportedOpError, InputError, NumericsError, PipelineError,
                        ArtifactError)
from lmc import ir  # noqa: F401
from lmc.options import CompileOptions  # noqa: F401,E402
from lmc.compile import compile, CompiledModel  # noqa: F401,E402,A001
from lmc.ir.parser import parse, parse_file  # noqa: F401,E402
