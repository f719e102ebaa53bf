"""The engine's error type."""


class NTKError(ValueError):
    """Raised when the engine is given input it cannot measure.

    Every message names the problem and the fix. It subclasses :class:`ValueError` so
    that generic ``except ValueError`` handlers (and the callback's fault handling)
    catch it.
    """
