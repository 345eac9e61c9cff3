"""streamer: real-time ECG artifact flags from bedside-monitor lead-II streams in Kafka.

The package root holds only the version: the worker is `streamer.runtime`, the commands `streamer.cli`,
offline scoring `streamer.offline.score` (score_series, score_file)."""

__version__ = "0.1.0"
