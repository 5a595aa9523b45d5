"""The one exception type for user mistakes; the CLI prints it as one line and exits non-zero."""


class TorchatError(Exception):
    """A user-facing error: the message names the file or key at fault and the fix."""


def unknown_key_error(kind: str, key: str, choices) -> TorchatError:
    """The error for a name outside a closed vocabulary, listing the valid choices."""
    return TorchatError(f"unknown {kind} {key!r}; choose one of: {', '.join(sorted(choices))}")
