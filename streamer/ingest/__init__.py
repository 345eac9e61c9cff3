"""Ingest: the message contract, decoders and the dead-letter topic."""
