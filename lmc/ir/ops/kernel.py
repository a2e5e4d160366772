"""The kernel dialect: `kernel.fused` outlines a group of tensor ops into one kernel.

The body is isolated from above (it sees only its block arguments), so a code generator can
compile it on its own. `kind` names the anchor (matmul, reduction, attention, grouped_matmul,
elementwise) that the backends pick a kernel template by.
"""
from lmc.errors import VerificationError
from lmc.ir.core import Op
from lmc.ir.ops import register

KINDS = ("elementwise", "reduction", "matmul", "attention", "grouped_matmul", "opaque")


@register
class Fused(Op):
    name = "kernel.fused"
    operands = ("*inputs",)
    attrs = {"kind": "elementwise"}
    results = None
    declared = True
    has_region = True

    def verify(self):
        super().verify()
        if self.kind not in KINDS:
            raise VerificationError(f"kind '{self.kind}' is not one of {KINDS}", op=self)
        if len(self.regions) != 1 or len(self.regions[0].blocks) != 1:
            raise VerificationError("needs exactly one region with one block", op=self)
        body = self.body
        if [a.type for a in body.args] != [v.type for v in self.operand_values]:
            raise VerificationError("body argument types differ from the operand types", op=self)
        term = body.terminator
        if term is None or term.name != "kernel.yield":
            raise VerificationError("body must end in kernel.yield", op=self)
        if [v.type for v in term.operand_values] != [v.type for v in self.result_values]:
            raise VerificationError("kernel.yield types differ from the result types", op=self)


@register
class Yield(Op):
    name = "kernel.yield"
    operands = ("*values",)
    results = 0
    pure = False

    def infer_type(self):
        return ()
