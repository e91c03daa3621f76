"""Build (or check) the compiled kernels ahead of time: ``python -m merge_engine.build_kernels``."""
import logging
import sys

from merge_engine.ops import backends

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ready = backends.cpu_extension() is not None
    print("merge_engine CPU kernels:", "ready" if ready else "unavailable (PyTorch references in use)")
    sys.exit(0 if ready or not backends.kernels_enabled() else 1)
