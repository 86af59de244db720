"""Formats and persistence: image decoding, shards, stage manifests, the feature store, checkpoints."""
