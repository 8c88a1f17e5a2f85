"""Sparsifiers: the method registry, plans, rule kinds and the sparsify() verb."""
from .apply import SparsifyHandle, active_handle, parse_token_policy, sparsify
from .plan import Rule, SparsityPlan, effective_sparsity
from .registry import Method, fit, get_method, methods, register_method
from .kinds import register_rule

__all__ = ["fit", "methods", "register_method", "get_method", "Method", "Rule", "SparsityPlan",
           "effective_sparsity", "sparsify", "SparsifyHandle", "active_handle", "parse_token_policy",
           "register_rule"]
