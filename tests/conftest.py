"""Test-session set-up: compile caches go to a temp dir, never to the user's ~/.cache/lmc."""
import os
import tempfile

os.environ.setdefault("LMC_CACHE_DIR", tempfile.mkdtemp(prefix="lmc-test-cache-"))
