"""The package version, importable by every layer (the package root sits above them all)."""

__version__ = "0.1.0"
