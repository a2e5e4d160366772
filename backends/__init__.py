"""lmc backends: reference (numpy interpreter); cpu (llvmlite) and gpu (Triton) arrive with their
issues."""
