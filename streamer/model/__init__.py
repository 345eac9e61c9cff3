"""The released artifact model: preprocessing, network, checkpoint loading, batched scoring."""
