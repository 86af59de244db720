"""nvjpeg (torchvision on CUDA) against the project's decode function (PIL), |difference| in grey levels.

Per content (random-colour photos like the tests', scikit-image's natural photos) and JPEG chroma
subsampling (4:2:0, 4:4:4): mean, p99, p99.9 and max, for torchvision's CPU decoder and for nvjpeg.
tests/test_extract.py states its tolerance from these figures. Usage: python benchmarks/decode_agreement.py
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from semspai.pipeline.demodata import synthetic_photo
from semspai.store.images import decode_image


def jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", **kw)
    return buf.getvalue()


def stats(got: np.ndarray, want: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float32) - want.astype(np.float32))
    return {"mean": round(float(d.mean()), 3), "p99": float(np.quantile(d, 0.99)),
            "p999": float(np.quantile(d, 0.999)), "max": float(d.max())}  # fmt: skip


def main() -> None:
    contents = {
        f"random-{w}x{h}": synthetic_photo(w, h, s) for s, (w, h) in enumerate(((224, 224), (700, 250), (513, 389)))
    }
    try:
        import skimage.data

        contents.update({n: getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")})
    except ImportError:
        print("scikit-image missing: random content only")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name, rgb in contents.items():
        for chroma, kw in (("420", {"quality": 90}), ("444", {"quality": 90, "subsampling": 0})):
            data = jpeg(rgb, **kw)
            want = decode_image(data)
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            row = {"content": name, "chroma": chroma}
            for dev in devices:
                got = decode_jpeg(raw, mode=ImageReadMode.RGB, device=dev).permute(1, 2, 0).cpu().numpy()
                row[dev] = stats(got, want)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_agreement.json"), "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
