"""Errors a user can act on. Each message is one line naming the field, file or tensor."""


class EvomergeError(Exception):
    """Base class: the CLI prints the message on one line and exits with code 2."""


class ConfigError(EvomergeError):
    """A config file or a command-line value is invalid."""


class ModelMismatchError(EvomergeError):
    """Source models cannot be merged (architecture, vocabulary, tensor names or shapes)."""


class MergeError(EvomergeError):
    """A merge method was given inputs it cannot combine (a candidate fails, the run goes on)."""


class ResumeError(EvomergeError):
    """A run directory cannot be resumed as asked."""


class EvalError(EvomergeError):
    """An evaluation could not produce the configured metrics."""


class ClusterLostError(EvomergeError):
    """The Ray cluster the workers ran on disappeared; the run is kept and can be resumed."""


class WorkerStartError(EvomergeError):
    """A worker could not start (its models or tasks failed to load): nothing can run until fixed."""
