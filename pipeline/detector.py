"""The semspai detector: spectral patch vectors, optional CLIP fusion, attention pooling, one logit per image."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from semspai.pipeline.config import ModelConfig
from semspai.pipeline.fusion import SemanticFusionModule, SpectralContextAttention
from semspai.pipeline.grid import DEFAULT_RULE, PatchRule, crop_patches
from semspai.pipeline.spectral import PATCH_SIZE, FrequencyRestorationEstimator, load_encoder_config

log = logging.getLogger(__name__)


@dataclass
class DetectorBatch:
    """A packed batch of B images with any number of patches each."""

    patches: torch.Tensor  # (N, 3, 224, 224) float32 in [0, 1], all images' grid patches concatenated
    counts: torch.Tensor  # (B,) int64 on the CPU (read there: a step never waits for the device), sum == N
    global_vec: torch.Tensor | None = None  # (B, D) CLIP global vectors (float16/32, L2-normalised)
    local_vec: torch.Tensor | None = None  # (N, D) CLIP local vector of each patch, same order as patches


@dataclass
class DetectorOutput:
    logits: torch.Tensor  # (B,)
    embedding: torch.Tensor  # (B, HIDDEN_DIM) fused image representation (for a semantic-consistency loss)
    attention: list[torch.Tensor] | None  # per image (P_i,) attention weights, when return_maps=True
    gates: list[torch.Tensor] | None  # per image (P_i,) fusion gate strength, when the fusion has gates


def unit_pixels(patches: torch.Tensor) -> torch.Tensor:
    """Patches as cut, (N, S, S, 3) uint8 on any device -> (N, 3, S, S) float32 in [0, 1] on that device.

    Batches travel as uint8 (4x lighter) and become float where the model runs.
    """
    return patches.permute(0, 3, 1, 2).contiguous().float().div_(255)


def pack_images(
    images: list[np.ndarray], rule: PatchRule = DEFAULT_RULE
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Decoded (H, W, 3) uint8 images -> patches (N, 3, S, S) float32 in [0, 1], counts (B,), boxes per image."""
    crops, boxes = zip(*(crop_patches(img, rule) for img in images), strict=True)  # each (P_i, S, S, 3)
    counts = torch.tensor([len(c) for c in crops], dtype=torch.int64)
    return unit_pixels(torch.from_numpy(np.concatenate(crops))), counts, list(boxes)


class SemSpaiDetector(nn.Module):
    """Scores images of any size from their packed grid patches and (optionally) cached CLIP vectors."""

    def __init__(
        self,
        cfg: ModelConfig,
        clip_dim: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        sem = cfg.SEMANTIC
        self.chunk_size = cfg.SPECTRAL.CHUNK_SIZE
        self.spectral = FrequencyRestorationEstimator(
            load_encoder_config(cfg.SPECTRAL.ENCODER),
            cfg.HIDDEN_DIM,
            cfg.SPECTRAL.MASK_RADIUS,
            cfg.DROPOUT,
            weights=cfg.SPECTRAL.ENCODER_WEIGHTS,
            **dd,
        )
        self.fusion = None
        if sem.MODE != "none":
            self.fusion = SemanticFusionModule(
                sem.MODE, sem.FUSION, clip_dim, sem.PROJ_DIM, cfg.HIDDEN_DIM, sem.CONDITION_QUERY,
                cfg.SCA_HEADS, cfg.DROPOUT, **dd,
            )  # fmt: skip
        cond_dim = sem.PROJ_DIM if sem.MODE != "none" and sem.CONDITION_QUERY else 0
        self.pool = SpectralContextAttention(cfg.HIDDEN_DIM, cfg.SCA_HEADS, cond_dim, cfg.DROPOUT, **dd)
        self.head = nn.Linear(cfg.HIDDEN_DIM, 1, **dd)

    @property
    def semantic_mode(self) -> str:
        return "none" if self.fusion is None else self.fusion.mode

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch vectors (N, H), at most `chunk_size` patches through the encoder at a time (bounded memory).

        Except when a trainable encoder runs under autograd (training): the backward pass keeps every chunk's
        activations anyway, so chunks would bound nothing and only multiply the kernel launches of a step. On an
        accelerator the three views then go through the encoder as one batch (fewer launches again); on the CPU,
        where a launch costs nothing and large fresh buffers cost page faults, three calls measured faster.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.spectral.encoder.parameters()):
            return self.spectral(patches, joint=patches.device.type != "cpu")
        return torch.cat([self.spectral(chunk) for chunk in torch.split(patches, self.chunk_size)])

    def forward(self, batch: DetectorBatch, return_maps: bool = False) -> DetectorOutput:
        counts = batch.counts.cpu()  # a no-op for batches built as documented
        if counts.ndim != 1 or int(counts.sum()) != len(batch.patches) or bool((counts < 1).any()):
            raise ValueError(
                f"DetectorBatch.counts {counts.tolist()} must be positive and sum to the {len(batch.patches)} patches"
            )
        if batch.patches.shape[1:] != (3, PATCH_SIZE, PATCH_SIZE):
            raise ValueError(f"DetectorBatch.patches: expected (N, 3, {PATCH_SIZE}, {PATCH_SIZE}), got "
                             f"{tuple(batch.patches.shape)}; build batches with pack_images")  # fmt: skip
        feats = self.encode_patches(batch.patches)  # (N, H)
        gates = cond = None
        if self.fusion is not None:
            feats, gates, cond = self.fusion(feats, counts, batch.global_vec, batch.local_vec)
        embedding, weights = self.pool(feats, counts, cond)  # (B, H), (B, P_max)
        logits = self.head(embedding).squeeze(-1).float()  # (B,)
        attention = gate_maps = None
        if return_maps:
            attention = [w[:n] for w, n in zip(weights, counts.tolist(), strict=True)]
            if gates is not None:
                gate_maps = list(torch.split(gates, counts.tolist()))
        return DetectorOutput(logits=logits, embedding=embedding, attention=attention, gates=gate_maps)


def create_detector(
    model_cfg: ModelConfig, clip_dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> SemSpaiDetector:
    """Build the detector from the MODEL section; `clip_dim` is the CLIP vector width (0 allowed in mode none)."""
    sem = model_cfg.SEMANTIC
    if sem.MODE != "none" and clip_dim <= 0:
        raise ValueError(f"MODEL.SEMANTIC.MODE={sem.MODE} needs CLIP vectors: clip_dim must be > 0, got {clip_dim}")
    if model_cfg.HIDDEN_DIM % model_cfg.SCA_HEADS:
        raise ValueError(f"MODEL.HIDDEN_DIM={model_cfg.HIDDEN_DIM} is not a multiple of MODEL.SCA_HEADS="
                         f"{model_cfg.SCA_HEADS}")  # fmt: skip
    if model_cfg.SPECTRAL.CHUNK_SIZE < 1:
        raise ValueError(f"MODEL.SPECTRAL.CHUNK_SIZE must be >= 1, got {model_cfg.SPECTRAL.CHUNK_SIZE}")
    device = torch.device(device) if device is not None else None
    model = SemSpaiDetector(model_cfg, clip_dim, device=device, dtype=dtype)
    log.info(
        "detector: encoder %s, semantic %s/%s, %.2fM trainable parameters",
        model_cfg.SPECTRAL.ENCODER, model.semantic_mode, sem.FUSION,
        sum(p.numel() for p in trainable_parameters(model)) / 1e6,
    )  # fmt: skip
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters the optimiser should see: everything but a frozen pretrained encoder."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State of the trainable parameters and buffers only: a frozen encoder comes back from its weights file."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def state_misfit(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when `state` (a `trainable_state_dict`) fits `model`: the same keys, each of the same shape; else what
    does not, in a few words naming a key."""
    want = trainable_state_dict(model)
    extra, missing = sorted(set(state) - set(want)), sorted(set(want) - set(state))
    if extra:
        return f"{len(extra)} key(s) the model lacks, e.g. {extra[0]}"
    if missing:
        return f"{len(missing)} of the model's key(s) missing, e.g. {missing[0]}"
    for key in sorted(want):
        if tuple(state[key].shape) != tuple(want[key].shape):
            return f"{key} is {tuple(state[key].shape)}, the model's {tuple(want[key].shape)}"
    return ""


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` into `model` (a frozen encoder keeps the weights of its own file); a state
    that does not fit raises ValueError saying where (`state_misfit`), and leaves the model as it was."""
    misfit = state_misfit(model, state)
    if misfit:
        raise ValueError(misfit)
    model.load_state_dict(state, strict=False)
