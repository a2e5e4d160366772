"""The numpy reference interpreter: the semantic oracle of every test."""
from lmc.backends.reference.interpreter import IMPL, run_func, run_block, bind_symbols  # noqa: F401
