"""Exceptions a user can see. Each says what was wrong and what is allowed."""


class MoecompError(Exception):
    """Base of every error moecomp raises on purpose."""


class ConfigError(MoecompError, ValueError):
    """A configuration field is missing, unknown, of the wrong type or out of range.

    The message names the field (dotted path, e.g. ``genes.bits_max``) and what is allowed.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # raised in a worker process (Dask, a process pool), it must cross back intact
        return type(self), (self.field, self.problem)


class DataError(MoecompError):
    """A data set is missing or corrupt; the message says how to get it."""


class PathError(MoecompError):
    """A path given by the user is missing, a folder where a file is expected (or the other
    way round), or cannot be read or written; the message names the option and the path."""


class CodecError(MoecompError, ValueError):
    """A .mcz file is malformed, truncated, corrupt or exceeds a size limit."""


class RunError(MoecompError):
    """A run folder is missing, incomplete or does not hold the asked-for solution."""


class TargetError(MoecompError):
    """The teacher, its data and the fidelity measures do not fit together: the model rejects
    the inputs, splits disagree on their sizes, a divergence or metric returns the wrong
    shape. The message names the field or split, the shapes and the model's own error."""
