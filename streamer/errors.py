"""Errors the command line turns into a message and an exit code (standard library only: the CLI
imports this before anything slow)."""


class SettingsError(ValueError):
    """Invalid settings at start; the message names each bad setting. `streamer` exits 2."""
