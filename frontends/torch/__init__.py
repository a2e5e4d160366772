"""The PyTorch frontend: torch.export → lmc IR through a table of small per-ATen-op converters.

    m = lmc.frontends.torch.import_module(model, (x,), dynamic_shapes={"x": {0: Dim("B")}})
"""
from lmc.frontends.torch.context import CONVERTERS, NotConvertible, converter
from lmc.frontends.torch.export import TorchExportError, import_module

__all__ = ["CONVERTERS", "NotConvertible", "TorchExportError", "converter", "import_module"]
