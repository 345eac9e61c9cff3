"""Windows: grid arithmetic, offline segmentation, the streaming per-patient buffers, resampling."""
