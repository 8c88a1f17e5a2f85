"""Decode engine: a small Llama-family decoder with a static KV cache and CUDA-graphed steps (floor 2)."""

from .config import LLAMA2_7B, LLAMA3_8B, PRESETS, TINY, LlamaConfig
from .engine import Engine
from .plan import ROLES, EnginePlan, SiteRule

__all__ = ["Engine", "EnginePlan", "SiteRule", "LlamaConfig", "LLAMA2_7B", "LLAMA3_8B", "PRESETS", "ROLES", "TINY"]
