class UserError(ValueError):
    """A mistake in the user's input (flags, YAML, data), reported as one line with the fix.

    Raised before any weights load; the entrypoints print it without a traceback and exit 2.
    """
