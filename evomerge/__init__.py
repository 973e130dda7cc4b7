"""evomerge: evolve model-merge recipes with CMA-ES, lm-eval and Ray."""

__version__ = "0.1.0"
