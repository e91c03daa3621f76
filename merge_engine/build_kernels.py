"""Check the compiled kernels, building a development build where one is needed:
``python -m merge_engine.build_kernels``. Exit status 1 when the CPU kernels are unavailable."""
import logging
import sys

from merge_engine.ops import backends

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = backends.cpu_extension()
    where = "unavailable (PyTorch references in use)" if module is None else f"{module.__name__} ({module.__file__})"
    print("merge_engine CPU kernels:", where)
    sys.exit(0 if module is not None or not backends.kernels_enabled() else 1)
