"""Test-session settings.

Under pytest-xdist every worker (and every process it starts: notebook kernels, torchrun ranks)
uses one intra-op thread. Several workers each running torch's default thread pool on a 2-core
machine oversubscribe it badly: small tensor operations spin-wait for each other and the suite
runs many times slower.
"""

import os

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
