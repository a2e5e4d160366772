"""The lmc IR: types, values, ops, functions, modules; text printer and parser; verifier;
rewriter and pattern rules."""
from lmc.ir.core import REQUIRED, UNKNOWN_LOC, Block, Func, Location, Module, Op, Region, Value  # noqa: F401
from lmc.ir.ops import OPS, op_class, register  # noqa: F401
from lmc.ir.parser import parse, parse_file  # noqa: F401
from lmc.ir.printer import print_module  # noqa: F401
from lmc.ir.types import Dim, DType, TensorType  # noqa: F401
