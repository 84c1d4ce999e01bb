"""The one exception type users see: a one-line message that says what is wrong and what to do."""


class LrpcError(Exception):
    """Bad input or an unsupported model. The CLI prints it on one line and exits with code 2."""
