"""Errors the command line turns into one clear line and an exit status, never a traceback."""


class ScenarioError(ValueError):
    """The scenario is invalid; the message names the field and the problem (exit status 2)."""


class RunError(RuntimeError):
    """The run could not go on (a worker died, timed out or refused a request); exit status 1."""
