"""The numpy reference interpreter: the semantic oracle of every test."""
from lmc.backends.reference.interpreter import IMPL, bind_symbols, run_block, run_func  # noqa: F401
