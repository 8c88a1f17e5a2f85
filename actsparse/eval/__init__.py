"""Quality evaluation: perplexity (and, as they land, accuracy and fidelity)."""
from .perplexity import perplexity

__all__ = ["perplexity"]
