"""Model loading and site discovery."""
from .load import BUNDLED_MODELS, bundled_model_dir, load_model, resolve_model_source
from .sites import Block, Site, find_blocks, find_sites, hook_points

__all__ = ["load_model", "resolve_model_source", "bundled_model_dir", "BUNDLED_MODELS",
           "find_sites", "find_blocks", "hook_points", "Site", "Block"]
