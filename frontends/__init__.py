"""lmc frontends: one sub-package per source format (torch; onnx arrives with its issue)."""
