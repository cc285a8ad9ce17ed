"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """Bad input from the user (config, files, data): the message says what to do.

    The command line prints it as one line and exits with status 2, no traceback.
    """
