"""The base of every error whose message is written for the user (the CLI prints it without a traceback)."""


class FeatureScopeError(Exception):
    """Bad input or a missing resource; the message says what to do."""
