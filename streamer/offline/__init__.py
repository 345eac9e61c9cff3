"""Offline tools that reuse the stream's windows/ and model/ code: score, replay."""
