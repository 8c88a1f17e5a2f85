"""What every kernel test checks an output with, and the threshold it draws inputs against."""

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64, after checking that every element was written (outputs are poisoned)."""
    assert not torch.isnan(got).any(), "output has NaNs: some elements were never written"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def quantile_thresh(x: torch.Tensor, sparsity: float) -> float:
    """The |x| level under which a `sparsity` fraction of x lies."""
    return float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else 0.0
