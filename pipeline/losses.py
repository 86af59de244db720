"""Training loss: BCE on the image logit plus an optional contrastive semantic-consistency term."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossParts:
    total: torch.Tensor  # scalar that is back-propagated
    bce: torch.Tensor  # scalar
    semantic: torch.Tensor | None  # scalar, None when the term is disabled


def info_nce(image: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of image-side vectors (B, D) against their text targets (B, D) over the batch.

    Samples that share a target (one caption for a real and its fake, one prompt for two images) would be
    each other's false negatives, so the classes are the batch's distinct targets: (B, U) logits. They are
    found on the host (where the trainer keeps `text`): on the device, their count would stall the step.
    """
    unique, target = torch.unique(text.cpu(), dim=0, return_inverse=True)  # (U, D), (B,)
    unique, target = unique.to(image.device, non_blocking=True), target.to(image.device, non_blocking=True)
    logits = F.normalize(image, dim=-1) @ F.normalize(unique.to(image.dtype), dim=-1).T / temperature  # (B, U)
    return F.cross_entropy(logits, target)


class DetectionLoss(nn.Module):
    """BCE + `semantic_weight` x InfoNCE between a projection of the fused embedding and the sample's cached
    text vector (its caption's, else the best-matching prompt's: chosen in `pipeline.data.StoreJoin`).

    The projection is trained with the detector but is not part of it: predict never needs text.
    """

    def __init__(self, hidden_dim: int, clip_dim: int, semantic_weight: float, temperature: float) -> None:
        super().__init__()
        self.semantic_weight = semantic_weight
        self.temperature = temperature
        self.projection = nn.Linear(hidden_dim, clip_dim) if semantic_weight > 0 else None

    def forward(
        self, logits: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor, text_vec: torch.Tensor | None
    ) -> LossParts:
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        if self.projection is None:
            return LossParts(total=bce, bce=bce, semantic=None)
        if text_vec is None:
            raise ValueError("LOSS.SEMANTIC_WEIGHT > 0 needs each sample's text vector in the batch")
        semantic = info_nce(self.projection(embedding).float(), text_vec, self.temperature)
        return LossParts(total=bce + self.semantic_weight * semantic, bce=bce, semantic=semantic)
