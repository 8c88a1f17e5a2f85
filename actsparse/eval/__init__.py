"""Quality evaluation: perplexity, lm-eval accuracy, output fidelity vs dense, mask stability, decode speed, and
the registry of what a sweep cell measures (measures.py; the built-ins are declared in builtin_measures.py).

The functions are public as `actsparse.perplexity`, `actsparse.fidelity`, ... and live in their modules; this
package imports nothing, so that reading the measure registry (the CLI, reports) does not import torch.
"""
