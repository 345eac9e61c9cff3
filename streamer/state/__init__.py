"""Per-patient state that outlives a worker: what was reported, the segment grids, the episode."""
