"""streamer: real-time ECG artifact flags from bedside-monitor lead-II streams in Kafka.

The package's public face: the version and `score_series` (offline scoring from Python, docs/commands.md).
It sits above every layer (tests/unit/test_layering.py): the worker is `streamer.runtime`, the commands
`streamer.cli`, and no module of theirs imports this one."""

from streamer._version import __version__

__all__ = ["__version__", "score_series"]


def score_series(*args, **kwargs):
    """See streamer.offline.score.score_series (imported when called: pandas and torch are heavy)."""
    from streamer.offline.score import score_series as _score_series

    return _score_series(*args, **kwargs)
