"""streamer: real-time ECG artifact flags from bedside-monitor lead-II streams in Kafka."""

__version__ = "0.1.0"


def score_series(*args, **kwargs):
    """See streamer.offline.score.score_series (imported lazily: torch is heavy)."""
    from streamer.offline.score import score_series as _score_series

    return _score_series(*args, **kwargs)
