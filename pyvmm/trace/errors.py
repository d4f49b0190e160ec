"""The tracer's one error type: a one-line message for the user."""


class TraceError(Exception):
    """Tracing cannot start or go on; str() says why and, where possible, what to do."""
