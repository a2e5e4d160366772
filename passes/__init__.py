"""lmc passes: one module per pass or pass family, each registered by name."""
