"""Semantic fusion: cached CLIP global/local vectors injected into spectral patch vectors, and attention pooling."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# `counts` (B,) int64, patches per image, is host knowledge (the packing): every index derived from it is
# computed on the CPU and sent to the device, so no step ever waits for the device to report a size.


def _to(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.to(like.device, non_blocking=True)


def per_patch(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows per image (B, ...) -> one row per patch (N, ...): image i's row repeated counts[i] times."""
    counts = counts.cpu()
    return x[_to(torch.repeat_interleave(torch.arange(len(counts)), counts), x)]


def _valid(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool on the host: which padded slots hold a patch."""
    return torch.arange(width)[None, :] < counts.cpu()[:, None]


def pad_by_counts(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (N, ...) -> padded (B, P_max, ...) and a validity mask (B, P_max) on x's device."""
    padded = nn.utils.rnn.pad_sequence(list(torch.split(x, counts.tolist())), batch_first=True)
    return padded, _to(_valid(counts, padded.shape[1]), x)


def unpad(padded: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of `pad_by_counts`: (B, P_max, ...) -> packed (N, ...), without a boolean index (that would
    make the host wait for the device to count the mask)."""
    keep = _valid(counts, padded.shape[1]).flatten().nonzero().squeeze(1)  # computed on the host
    return padded.flatten(0, 1)[_to(keep, padded)]


def compute_global_semantic_context(global_vec: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each image's global vector (B, D) repeated for each of its patches -> (N, D), float32, L2-normalised."""
    g = F.normalize(global_vec.float(), dim=-1)  # stored as float16: renormalise so cosines are exact
    return per_patch(g, counts)


def compute_local_semantic_context(local_vec: torch.Tensor, global_ctx: torch.Tensor) -> torch.Tensor:
    """Per patch: its own local vector, its product with the image's global vector and their cosine.

    local_vec (N, D), global_ctx (N, D) from `compute_global_semantic_context` -> (N, 2D + 1), float32.
    """
    local = F.normalize(local_vec.float(), dim=-1)
    product = local * global_ctx  # which directions agree; its sum is the cosine
    return torch.cat([local, product, product.sum(dim=-1, keepdim=True)], dim=-1)


class FusionResult(NamedTuple):
    features: torch.Tensor  # (N, H) patch vectors after injection
    gates: torch.Tensor | None  # (N,) mean gate strength per patch, for fusions with gates
    query_context: torch.Tensor | None  # (B, P) projected global vector for the pooling query, or None


def _mlp(d_in: int, d_out: int, dropout: float, dd: dict) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out, **dd), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_out, d_out, **dd))


def _zero_last(module: nn.Module) -> nn.Module:
    # injections start as the identity, so a fused model begins as the spectral-only one and learns what to add
    last = module[-1] if isinstance(module, nn.Sequential) else module
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return module


class SemanticFusionModule(nn.Module):
    """Projects CLIP vectors to a per-patch semantic code (N, P) and injects it into patch vectors (N, H).

    mode `global` (Approach 1) uses the image's global vector; `global_local` (Approach 2) adds each patch's
    local vector and its agreement with the global one. `kind` is how the code enters the patch vector.
    """

    def __init__(
        self,
        mode: str,
        kind: str,
        clip_dim: int,
        proj_dim: int,
        hidden_dim: int,
        condition_query: bool,
        heads: int,
        dropout: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("global", "global_local"):
            raise ValueError(f"SemanticFusionModule: mode {mode!r} is not global or global_local")
        if clip_dim <= 0:
            raise ValueError(f"semantic mode {mode!r} needs CLIP vectors, but clip_dim is {clip_dim}")
        dd = {"device": device, "dtype": dtype}
        self.mode, self.kind, self.condition_query = mode, kind, condition_query
        self.global_proj = _mlp(clip_dim, proj_dim, dropout, dd)
        self.local_proj = _mlp(2 * clip_dim + 1, proj_dim, dropout, dd) if mode == "global_local" else None
        self.norm = nn.LayerNorm(proj_dim, **dd)
        if kind == "concat":
            self.inject = _zero_last(_mlp(hidden_dim + proj_dim, hidden_dim, dropout, dd))
        elif kind == "film":
            self.inject = _zero_last(_mlp(proj_dim, 2 * hidden_dim, dropout, dd))
        elif kind == "gate":
            self.gate = nn.Linear(hidden_dim + proj_dim, hidden_dim, **dd)
            self.inject = _mlp(proj_dim, hidden_dim, dropout, dd)
        elif kind == "cross_attn":
            self.query_norm = nn.LayerNorm(hidden_dim, **dd)
            self.attn = nn.MultiheadAttention(
                hidden_dim, heads, dropout=dropout, kdim=proj_dim, vdim=proj_dim, batch_first=True, **dd
            )
            _zero_last(self.attn.out_proj)
        else:
            raise ValueError(f"MODEL.SEMANTIC.FUSION: unknown fusion {kind!r}")

    def semantic_code(
        self, counts: torch.Tensor, global_vec: torch.Tensor, local_vec: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch semantic code (N, P) and the projected global vector per image (B, P)."""
        dtype = self.norm.weight.dtype
        g_img = self.global_proj(F.normalize(global_vec.float(), dim=-1).to(dtype))  # (B, P)
        code = per_patch(g_img, counts)  # (N, P)
        if self.local_proj is not None:
            if local_vec is None:
                raise ValueError("semantic mode global_local needs batch.local_vec (one CLIP vector per patch)")
            local = compute_local_semantic_context(local_vec, compute_global_semantic_context(global_vec, counts))
            code = code + self.local_proj(local.to(dtype))
        return self.norm(code), g_img

    def forward(
        self,
        features: torch.Tensor,
        counts: torch.Tensor,
        global_vec: torch.Tensor | None,
        local_vec: torch.Tensor | None = None,
    ) -> FusionResult:
        if global_vec is None:
            raise ValueError(f"semantic mode {self.mode!r} needs batch.global_vec (one CLIP vector per image)")
        code, g_img = self.semantic_code(counts, global_vec, local_vec)  # (N, P), (B, P)
        gates = None
        if self.kind == "concat":
            out = features + self.inject(torch.cat([features, code], dim=-1))
        elif self.kind == "film":
            scale, shift = self.inject(code).chunk(2, dim=-1)  # (N, H) each
            out = features * (1 + scale) + shift
        elif self.kind == "gate":
            gate = torch.sigmoid(self.gate(torch.cat([features, code], dim=-1)))  # (N, H)
            out = features + gate * self.inject(code)
            gates = gate.mean(dim=-1)
        else:
            out = features + self._cross_attend(features, code, counts)
        return FusionResult(out, gates, g_img if self.condition_query else None)

    def _cross_attend(self, features: torch.Tensor, code: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # each patch attends over the semantic codes of all patches of its own image (no positions)
        q, mask = pad_by_counts(self.query_norm(features), counts)  # (B, P_max, H), (B, P_max)
        kv, _ = pad_by_counts(code, counts)  # (B, P_max, P)
        out, _ = self.attn(q, kv, kv, key_padding_mask=~mask, need_weights=False)
        return unpad(out, counts)  # (N, H), back in packed order


class SpectralContextAttention(nn.Module):
    """SCA: a learnable query cross-attends over any number of patch vectors (no positional embedding)."""

    def __init__(
        self,
        hidden_dim: int,
        heads: int,
        cond_dim: int,
        dropout: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.query = nn.Parameter(torch.randn(hidden_dim, **dd) * 0.02)
        # the global CLIP vector may steer which patches the query looks for (CONDITION_QUERY)
        self.cond = _zero_last(nn.Linear(cond_dim, hidden_dim, **dd)) if cond_dim else None
        self.norm = nn.LayerNorm(hidden_dim, **dd)
        self.attn = nn.MultiheadAttention(hidden_dim, heads, dropout=dropout, batch_first=True, **dd)
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim, **dd), _mlp(hidden_dim, hidden_dim, dropout, dd))

    def forward(
        self, features: torch.Tensor, counts: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch vectors (N, H) -> image vectors (B, H) and attention weights padded to (B, P_max)."""
        kv, mask = pad_by_counts(self.norm(features), counts)  # (B, P_max, H)
        q = self.query.expand(len(counts), 1, -1)  # (B, 1, H)
        if self.cond is not None:
            if cond is None:
                raise ValueError("this pooling was built with a conditioned query but got no global context")
            q = q + self.cond(cond)[:, None, :]
        pooled, weights = self.attn(q, kv, kv, key_padding_mask=~mask, need_weights=True)  # (B, 1, H), (B, 1, P)
        pooled = pooled[:, 0]
        return pooled + self.out(pooled), weights[:, 0]
