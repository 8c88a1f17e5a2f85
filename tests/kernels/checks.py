"""What every kernel test checks an output with."""

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64, after checking that every element was written (outputs are poisoned)."""
    assert not torch.isnan(got).any(), "output has NaNs: some elements were never written"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()
