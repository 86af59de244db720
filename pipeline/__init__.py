"""The ML library: patch grid, CLIP embedder, spectral encoder, fusion, data, losses, engine, metrics."""
