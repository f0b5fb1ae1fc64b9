import sys


class UserError(ValueError):
    """A mistake in the user's input (flags, YAML, data), reported as one line with the fix.

    Raised before any weights load; the entrypoints print it without a traceback and exit 2.
    """


def exit_code_of(command) -> int:
    """Run a command-line entry point: a UserError becomes one `error: ...` line and exit code 2."""
    try:
        command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
