"""PyHessian (an independent implementation) agrees on the full-model top eigenvalue and trace."""

import numpy as np
import pytest
import torch
from torch import nn

from hessian_blocks.hvp import BlockHessian
from tests.oracles import dense_hessian

pyhessian = pytest.importorskip("pyhessian")


def test_top_eigenvalue_matches_pyhessian_and_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    criterion = nn.CrossEntropyLoss()
    theirs = pyhessian.hessian(model, criterion, data=(x, y), cuda=False)
    top_theirs = theirs.eigenvalues(maxIter=500, tol=1e-8, top_n=1)[0][0]

    ours = BlockHessian(model, criterion, [(x, y)])
    operator = ours.linear_operator("full")
    from scipy.sparse.linalg import eigsh

    top_ours = eigsh(operator, k=1, which="LA", return_eigenvectors=False)[0]
    top_dense = np.linalg.eigvalsh(dense_hessian(model, criterion, [(x, y)]).matrix.numpy()).max()
    assert top_ours == pytest.approx(top_dense, rel=1e-9)
    assert top_theirs == pytest.approx(top_ours, rel=1e-4)  # pyhessian works in float32, power iteration


def test_hvp_matches_pyhessian_dataloader_hvp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(12, 5), torch.randint(0, 2, (12,))
    criterion = nn.CrossEntropyLoss()
    theirs = pyhessian.hessian(model, criterion, data=(x, y), cuda=False)
    vector = [torch.randn_like(p) for p in model.parameters()]
    from pyhessian.utils import hessian_vector_product

    hv_theirs = hessian_vector_product(theirs.gradsH, theirs.params, vector)
    ours = BlockHessian(model, criterion, [(x, y)]).matvec(torch.cat([v.reshape(-1) for v in vector]).double())
    torch.testing.assert_close(ours.float(), torch.cat([h.reshape(-1) for h in hv_theirs]), rtol=1e-4, atol=1e-6)
