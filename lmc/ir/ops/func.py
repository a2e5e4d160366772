"""Function-level ops."""
from lmc.ir.core import Op
from lmc.ir.ops import register


@register
class Return(Op):
    name = "func.return"
    operands = ("*values",)
    results = 0
    pure = False

    def infer_type(self):
        return ()
