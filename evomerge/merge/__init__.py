"""Pure tensor merge functions, registered by name.

    from evomerge.merge import get_method
    merged = get_method("ties").fn(base, [e1, e2], weight=[0.6, 0.4], density=[0.5, 0.5])

See `registry` for the uniform call signature, validation and each method's facts (its genes,
fixed genes and their defaults, expert counts: the one place that knows them), `methods` for the
methods, `tensor_ops` and `chunked` for the shared building blocks, `merger` for applying a recipe
to every tensor of a model, and `mergekit` for mergekit configs read (`evomerge merge`) and
written (`evomerge export`).

Adding a method is one decorated function in `methods` (plus its tests): config validation, the
genome layout, export and `evomerge merge` read the registry.
"""

from evomerge.merge import methods as _methods  # noqa: F401  (registers the built-in methods)
from evomerge.merge.registry import METHODS, MergeMethod, get_method, register

__all__ = ["METHODS", "MergeMethod", "get_method", "register"]
