"""Publish stage: flag messages (messages.py), episodes (episodes.py), sending them (publisher.py)."""
