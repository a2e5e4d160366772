"""The lmc IR: types, values, ops, functions, modules; text printer and parser; verifier;
rewriter and pattern rules."""
from lmc.ir.types import DType, TensorType, Dim  # noqa: F401
from lmc.ir.core import (Block, Func, Location, Module, Op, Region, Value,  # noqa: F401
                         UNKNOWN_LOC, REQUIRED)
from lmc.ir.ops import OPS, op_class, register  # noqa: F401
from lmc.ir.printer import print_module  # noqa: F401
from lmc.ir.parser import parse, parse_file  # noqa: F401
