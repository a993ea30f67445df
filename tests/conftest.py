"""Test-session settings.

Under pytest-xdist every worker (and every process it starts: notebook kernels, torchrun ranks)
uses one intra-op thread. Several workers each running torch's default thread pool on a 2-core
machine oversubscribe it badly: small tensor operations spin-wait for each other and the suite
runs many times slower.

Triton is imported here with its interpreter on (``TRITON_INTERPRET=1``), then the variable is
unset again: Triton decides at import whether its own library functions (``tl.sum``, ...) run in
the interpreter, so it must be on the first time anything imports triton (Inductor does, in the
compiled-path tests). The kernel tests (tests/test_kernels.py) switch the interpreter on for
themselves; every other test sees the variable unset, as users do.
"""

import importlib.util
import os

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)

if importlib.util.find_spec("triton") is not None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401

    del os.environ["TRITON_INTERPRET"]
