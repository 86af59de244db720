"""The semspai detector: spectral patch vectors, optional CLIP fusion, attention pooling, one logit per image."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from semspai.pipeline.config import ModelConfig
from semspai.pipeline.fusion import SemanticFusionModule, SpectralContextAttention
from semspai.pipeline.grid import DEFAULT_RULE, PatchRule, crop_patches
from semspai.pipeline.spectral import (
    PATCH_SIZE,
    FrequencyRestorationEstimator,
    SpectralEncoderConfig,
    load_encoder_config,
)

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


def fingerprints(rows: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """(N, F) pixel rows in [0, 1] -> (N,) float64: equal rows get equal values, whatever the row's position
    (BLAS sums rows in orders that depend on it, so a float sum would not), and unequal rows almost always differ.

    The sum runs over grey levels (0..255) times integer weights below 2**20, every partial sum an integer under
    2**53, hence exact in any order. Values off the 1/255 grid only make more rows collide.
    """
    f = rows.shape[1]
    weights = (torch.arange(f, device=rows.device, dtype=torch.float64) * 40503 % 1048573) + 1
    with torch.autocast(rows.device.type, enabled=False):
        return torch.cat([part.double().mul_(255).round_() @ weights for part in torch.split(rows, chunk)])


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where x (N, ...) repeats rows: `(first, inverse)` with `x[first]` its distinct rows in order of first
    occurrence and `x[first][inverse]` equal to x, bit for bit; None when no row repeats.

    A 224-px image's five crops are one patch five times, and flat regions of a large image (a screenshot's
    white) repeat too: eval-mode encoders then compute each once. Rows are grouped by a fingerprint and every
    grouped row is compared in full with its group's first, so a fingerprint collision costs only a missed
    repeat. It reads sizes back from the device (as `torch.unique` does): a pause per batch, where eval and
    predict read each batch's scores anyway.
    """
    n = len(x)
    if n < 2:
        return None
    flat = x.reshape(n, -1)
    _, group = torch.unique(fingerprints(flat), return_inverse=True)  # (N,) group of each row
    order = torch.arange(n, device=x.device)
    first_of_group = torch.full((n,), n, device=x.device).scatter_reduce_(0, group, order, "amin")
    rep = first_of_group[group]  # (N,) each row's candidate original
    cand = (rep != order).nonzero().squeeze(1)
    if len(cand) == 0:
        return None
    differ = (flat[cand] != flat[rep[cand]]).any(dim=1)
    rep[cand[differ]] = cand[differ]  # a fingerprint collision: the row stands for itself
    first, inverse = torch.unique(rep, return_inverse=True)  # sorted: first occurrences in order
    return None if len(first) == n else (first, inverse)


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
        encoder: SpectralEncoderConfig | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        sem = cfg.SEMANTIC
        self.chunk_size = cfg.SPECTRAL.CHUNK_SIZE
        # the model JSON as built: a checkpoint records it, so it rebuilds the same whatever the file says later
        self.encoder_config = encoder if encoder is not None else load_encoder_config(cfg.SPECTRAL.ENCODER)
        self.spectral = FrequencyRestorationEstimator(
            self.encoder_config,
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
        where a launch costs nothing, three calls measured faster with glibc's default allocator (page faults on
        large fresh buffers) and alike with the command's settings (pipeline/host.py), and peak lower.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.spectral.encoder.parameters()):
            return self.spectral(patches, joint=patches.device.type != "cpu")
        # in eval mode equal patches give equal vectors (no dropout, fixed norms): encode each distinct one once
        repeats = None if self.training else distinct_rows(patches)
        if repeats is not None:
            first, inverse = repeats
            return self._encode_chunks(patches[first])[inverse]
        return self._encode_chunks(patches)

    def _encode_chunks(self, patches: torch.Tensor) -> torch.Tensor:
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
    model_cfg: ModelConfig,
    clip_dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    encoder: SpectralEncoderConfig | None = None,
) -> SemSpaiDetector:
    """Build the detector from the MODEL section; `clip_dim` is the CLIP vector width (0 allowed in mode none);
    `encoder`: the spectral model JSON as a checkpoint recorded it (default: MODEL.SPECTRAL.ENCODER's file)."""
    sem = model_cfg.SEMANTIC
    if sem.MODE != "none" and clip_dim <= 0:
        raise ValueError(f"MODEL.SEMANTIC.MODE={sem.MODE} needs CLIP vectors: clip_dim must be > 0, got {clip_dim}")
    if model_cfg.HIDDEN_DIM % model_cfg.SCA_HEADS:
        raise ValueError(f"MODEL.HIDDEN_DIM={model_cfg.HIDDEN_DIM} is not a multiple of MODEL.SCA_HEADS="
                         f"{model_cfg.SCA_HEADS}")  # fmt: skip
    if model_cfg.SPECTRAL.CHUNK_SIZE < 1:
        raise ValueError(f"MODEL.SPECTRAL.CHUNK_SIZE must be >= 1, got {model_cfg.SPECTRAL.CHUNK_SIZE}")
    device = torch.device(device) if device is not None else None
    model = SemSpaiDetector(model_cfg, clip_dim, device=device, dtype=dtype, encoder=encoder)
    log.info(
        "detector: encoder %s, semantic %s/%s, %.2fM trainable parameters",
        model_cfg.SPECTRAL.ENCODER, model.semantic_mode, sem.FUSION,
        sum(p.numel() for p in trainable_parameters(model)) / 1e6,
    )  # fmt: skip
    return model


def encoder_record(model: SemSpaiDetector) -> dict:
    """What a checkpoint keeps of the spectral encoder: its model JSON as built, and the sha256 of a frozen
    encoder's weights file (which the checkpoint does not hold)."""
    return {
        "config": dataclasses.asdict(model.encoder_config),
        "weights_sha256": model.spectral.encoder.weights_sha256,
    }


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
