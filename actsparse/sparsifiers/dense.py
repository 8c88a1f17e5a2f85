"""dense: the identity plan, the baseline row of every table."""
from __future__ import annotations

from .registry import Method, register_method


@register_method("dense")
class Dense(Method):
    """No sparsity: no rules. The target sparsity is ignored (recorded as 0)."""
    uses_target = False

    def fit(self, stats, sparsity, params, model):
        return []
