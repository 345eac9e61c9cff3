"""Developer tools that are not part of the runtime package: building the demo checkpoint, training helpers."""
