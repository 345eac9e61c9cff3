"""Kafka plumbing: embedded broker, client factories, topics, commit policy."""
