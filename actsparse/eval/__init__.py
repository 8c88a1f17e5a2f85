"""Quality evaluation: perplexity, lm-eval accuracy (lm_eval_accuracy) and output fidelity vs dense."""
from .fidelity import fidelity
from .lm_eval import lm_eval_accuracy, offline_tasks
from .perplexity import perplexity

__all__ = ["perplexity", "fidelity", "lm_eval_accuracy", "offline_tasks"]
