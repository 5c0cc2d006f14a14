import pytest
import torch

from flows import SOLVERS, integrate
from flows.solvers import uniform_grid


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_3t_squared_integrates_to_x_plus_one_with_exact_nfe(solver):
    x0 = torch.randn(4, 2)
    steps = 200
    out = integrate(lambda x, t: 3 * t[:, None] ** 2 * torch.ones_like(x), x0, uniform_grid(steps), solver)
    tol = {"euler": 2e-2, "midpoint": 1e-4, "heun": 1e-4}.get(solver, 1e-5)  # global error O(h^order)
    assert torch.allclose(out.x, x0 + 1, atol=tol)
    assert out.nfe == steps * SOLVERS[solver][1]


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be positive"):
        uniform_grid(0)
