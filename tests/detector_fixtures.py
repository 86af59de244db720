"""Tiny trained-looking checkpoints for the eval and predict tests, built directly (no training run needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from semspai.pipeline.clip import load_embedder
from semspai.pipeline.config import RunConfig
from semspai.pipeline.detector import create_detector, trainable_state_dict
from semspai.store.checkpoints import save_checkpoint

CLIP = "tiny-random"


def make_checkpoint(path: Path, mode: str = "global_local", fusion: str = "gate", threshold: float = 0.5,
                    seed: int = 0, chunk_size: int = 4, train_generators: dict[str, int] | None = None) -> Path:  # fmt: skip
    """A checkpoint of the smallest encoder with seeded random weights, in the layout `semspai train` writes.

    The head bias is spread so that scores differ visibly between images (a fresh head gives ~0.5 for all).
    `train_generators` (generator -> fakes seen) also sets DATA.GENERATORS; None leaves both out, as in a
    checkpoint of a semspai that did not record them.
    """
    cfg = RunConfig()
    cfg.MODEL.SPECTRAL.ENCODER = "spectral-vit-micro"
    cfg.MODEL.SPECTRAL.CHUNK_SIZE = chunk_size
    cfg.MODEL.HIDDEN_DIM = 32
    cfg.MODEL.SEMANTIC.PROJ_DIM = 16
    cfg.MODEL.SEMANTIC.MODE = mode
    cfg.MODEL.SEMANTIC.FUSION = fusion
    cfg.MODEL.USE_SEMANTIC_CONTEXT = mode != "none"
    cfg.DATA.GENERATORS = sorted(train_generators or [])
    cfg.validate()
    spec = load_embedder(CLIP).spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_detector(cfg.MODEL, spec.embed_dim)
        with torch.no_grad():
            model.head.weight.mul_(8.0)  # a random head, scaled so scores spread over (0, 1)
            model.head.bias.zero_()
    state = {
        "model": trainable_state_dict(model),
        "config": cfg.to_dict(),
        "clip_spec": spec.to_dict() if mode != "none" else {},
        "clip_dim": spec.embed_dim,
        "threshold": threshold,
    }
    if train_generators is not None:
        state["train_generators"] = train_generators
    save_checkpoint(path, state)
    return path
