"""Detector cost: parameters and MACs per semantic mode and fusion, and the spectral encoder's GMACs per patch.

Run: python benchmarks/model_cost.py [--encoder spectral-vit-tiny] [--clip-dim 512] [--patches 4]
MACs are FlopCounterMode FLOPs / 2 (the FFT filters are not counted; they are O(S^2 log S), negligible).
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from semspai.pipeline.config import FUSION_KINDS, ModelConfig
from semspai.pipeline.detector import DetectorBatch, create_detector, trainable_parameters

TARGET_GMACS = 3.5  # DESIGN.md: default spectral encoder, all three views of one 224 patch


def count_macs(fn) -> int:
    # grad mode stays on: FlopCounterMode's module tracker raises under torch.no_grad here (torch 2.14)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=ModelConfig().SPECTRAL.ENCODER)
    parser.add_argument("--clip-dim", type=int, default=512)  # ViT-B-32 CLIP
    parser.add_argument("--patches", type=int, default=4, help="patches of the one image scored (512x512 -> 4)")
    args = parser.parse_args()
    # the fused CPU attention kernel is invisible to FlopCounterMode: count the explicit matmuls instead
    timm.layers.set_fused_attn(False)
    torch.manual_seed(0)
    n = args.patches
    batch = DetectorBatch(
        patches=torch.rand(n, 3, 224, 224),
        counts=torch.tensor([n]),
        global_vec=torch.nn.functional.normalize(torch.randn(1, args.clip_dim), dim=-1),
        local_vec=torch.nn.functional.normalize(torch.randn(n, args.clip_dim), dim=-1),
    )
    rows = [("none", "-")] + [(mode, kind) for mode in ("global", "global_local") for kind in FUSION_KINDS]
    print(f"encoder {args.encoder}, CLIP dim {args.clip_dim}, one image of {n} patches")
    print(
        f"{'mode':<13} {'fusion':<11} {'params (M)':>10} {'trainable (M)':>13} {'GMACs/image':>11} {'fusion+head MMACs':>17}"
    )
    for mode, kind in rows:
        cfg = ModelConfig(USE_SEMANTIC_CONTEXT=mode != "none")
        cfg.SPECTRAL.ENCODER = args.encoder
        cfg.SEMANTIC.MODE, cfg.SEMANTIC.FUSION = mode, kind if kind != "-" else "film"
        model = create_detector(cfg, args.clip_dim if mode != "none" else 0).eval()
        total = count_macs(lambda model=model: model(batch))
        spectral = count_macs(lambda model=model: model.encode_patches(batch.patches))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        trainable = sum(p.numel() for p in trainable_parameters(model)) / 1e6
        print(f"{mode:<13} {kind:<11} {params:>10.2f} {trainable:>13.2f} {total / 1e9:>11.3f} "
              f"{(total - spectral) / 1e6:>17.2f}")  # fmt: skip
    per_patch = count_macs(lambda: model.encode_patches(batch.patches[:1])) / 1e9
    verdict = "meets" if per_patch <= TARGET_GMACS else "MISSES"
    print(f"spectral branch, one 224 patch, 3 views + SRS: {per_patch:.3f} GMACs ({verdict} the {TARGET_GMACS} target)")


if __name__ == "__main__":
    main()
