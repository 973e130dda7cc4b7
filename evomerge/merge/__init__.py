"""Pure tensor merge functions, registered by name.

    from evomerge.merge import get_method
    merged = get_method("ties").fn(base, [e1, e2], weight=[0.6, 0.4], density=[0.5, 0.5])

See `registry` for the uniform call signature and validation, `methods` for the methods and
`tensor_ops` for the shared building blocks.
"""

from evomerge.merge.registry import METHODS, MergeMethod, get_method, register
from evomerge.merge import methods as _methods  # noqa: F401  (registers the built-in methods)

__all__ = ["METHODS", "MergeMethod", "get_method", "register"]
