"""The one exception every subcommand raises for input a user can fix."""


class UsageError(Exception):
    """Bad input a user can fix; printed as one line, exit code 2."""
