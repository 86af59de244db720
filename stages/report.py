"""Report output for eval and predict: ROC/PR/score plots, patch heatmaps, and one document as Markdown and HTML."""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from semspai.pipeline.grid import DEFAULT_RULE, pad_image  # noqa: E402
from semspai.pipeline.inference import PatchMaps  # noqa: E402

DPI = 110
HEATMAP_MAX_SIDE = 900  # display pixels of a heatmap panel's long side; a 4K image is shown downscaled
MAX_LABELLED_PATCHES = 40  # beyond this, per-patch value labels would overlap into noise
CLASS_COLOURS = {"real": "#2b8cbe", "fake": "#e6550d"}


def _save(fig: plt.Figure, path: Path) -> Path:
    with warnings.catch_warnings():  # a title in a script the font lacks (file names) is drawn with boxes, quietly
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@dataclass
class Curve:
    """Scores of one population against all reals, drawn as one line of the ROC and PR plots."""

    name: str
    labels: np.ndarray  # (n,) 0 real / 1 fake
    scores: np.ndarray  # (n,) P(fake)
    auc: float | None
    ap: float | None
    bold: bool = False


def plot_roc(curves: Sequence[Curve], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--", label="chance")
    for c in curves:
        if c.auc is None:
            continue
        fpr, tpr, _ = roc_curve(c.labels, c.scores)
        ax.plot(fpr, tpr, lw=2.6 if c.bold else 1.4, label=f"{c.name} (AUC {c.auc:.3f})", drawstyle="steps-post")
    ax.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes caught)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(curves: Sequence[Curve], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for c in curves:
        if c.ap is None:
            continue
        precision, recall, _ = precision_recall_curve(c.labels, c.scores)
        ax.plot(recall, precision, lw=2.6 if c.bold else 1.4, label=f"{c.name} (AP {c.ap:.3f})", drawstyle="steps-post")
        ax.axhline(c.labels.mean(), color="0.8", lw=0.8, ls=":")  # a random detector's precision
    ax.set(xlabel="recall (fakes caught)", ylabel="precision (of images called fake)", xlim=(-0.01, 1.01),
           ylim=(0, 1.02), title=title)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_scores(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> Path:
    """Histogram of P(fake) per class, with the decision threshold: shows separation and calibration at once."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bins = np.linspace(0, 1, 41)
    for name, value in (("real", 0), ("fake", 1)):
        ax.hist(scores[labels == value], bins=bins, alpha=0.6, color=CLASS_COLOURS[name],
                label=f"{name} (n={int((labels == value).sum())})")  # fmt: skip
    ax.axvline(threshold, color="k", lw=1.2, ls="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="score = P(fake)", ylabel="images", xlim=(0, 1), title="Score distribution")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_robustness(names: Sequence[str], series: dict[str, Sequence[float | None]], path: Path) -> Path:
    """AUC under each perturbation (x) for each checkpoint (one line each)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    for label, values in series.items():
        ax.plot(x, [np.nan if v is None else v for v in values], marker="o", label=label)
    ax.axhline(0.5, color="0.75", lw=1, ls="--")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="AUC", ylim=(0, 1.02), title="Robustness: AUC under perturbation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def patch_value_map(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Paint one value per patch box into an (H, W) map; overlapping five-crop patches are averaged and
    pixels no patch covers (dropped remainders) are NaN, so they show the bare image."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    for (x0, y0, x1, y1), v in zip(boxes.tolist(), values.tolist(), strict=True):
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def plot_heatmap(rgb: np.ndarray, maps: PatchMaps, title: str, path: Path) -> Path:
    """The image, then its attention per patch (x P, so 1 is an even share) and, when the fusion has gates,
    the gate strength per patch, each over a grey copy of the image (padded as the detector saw it), with
    each patch's value written at its centre while there are few enough patches to read them."""
    padded = pad_image(rgb, DEFAULT_RULE)
    h, w = padded.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / HEATMAP_MAX_SIDE)))  # nearest-neighbour thumbnail: exact patch edges
    shown = padded[::step, ::step]
    grey = shown.mean(axis=2)  # colour would fight the colour map
    attention = maps.attention * len(maps.attention)
    # fixed scales, so a near-uniform map looks uniform instead of stretching noise over the whole colour map
    panels = [("attention × patches (1 = even share)", attention, "magma", 0.0, max(2.0, float(attention.max())))]
    if maps.gates is not None:
        panels.append(("fusion gate (0 = spectral only)", maps.gates, "viridis", 0.0, 1.0))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.6 * (1 + len(panels)), 3.6 * h / w + 0.8),
                             squeeze=False, layout="constrained")  # fmt: skip
    axes[0, 0].imshow(shown, extent=(0, w, h, 0))
    axes[0, 0].set_title(f"image ({rgb.shape[1]}×{rgb.shape[0]})", fontsize=9)
    label_patches = len(maps.boxes) <= MAX_LABELLED_PATCHES
    for ax, (name, values, cmap, lo, hi) in zip(axes[0, 1:], panels, strict=True):
        ax.imshow(grey, extent=(0, w, h, 0), cmap="gray", vmin=0, vmax=255)
        grid = patch_value_map((h, w), maps.boxes, np.asarray(values))[::step, ::step]
        im = ax.imshow(grid, extent=(0, w, h, 0), cmap=cmap, vmin=lo, vmax=hi, alpha=0.6)
        for (x0, y0, x1, y1), v in zip(maps.boxes.tolist(), np.asarray(values).tolist(), strict=True):
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, ec="white", alpha=0.7))
            if label_patches:
                ax.text(
                    (x0 + x1) / 2,
                    (y0 + y1) / 2,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.45, "lw": 0},
                )
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes[0]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@dataclass
class Document:
    """A report built once as blocks and written both as Markdown and as HTML (same content, same files)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(("table", list(header), [[_fmt(v) for v in r] for r in rows]))

    def images(self, paths: Sequence[Path], root: Path, captions: Sequence[str] = ()) -> None:
        rel = [os.path.relpath(p, root) for p in paths]
        self.blocks.append(("img", rel, list(captions) or [""] * len(rel)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                out += [f"## {block[1]}", ""]
            elif kind == "p":
                out += [block[1], ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            else:
                out += [f"![{c or Path(p).stem}]({p})" for p, c in zip(block[1], block[2], strict=True)] + [""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                body.append(f"<h2>{e(block[1])}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline_code(e(block[1]))}</p>")
            elif kind == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                figs = "".join(
                    f'<figure><img src="{e(p)}" alt="{e(c or Path(p).stem)}"><figcaption>{e(c)}</figcaption></figure>'
                    for p, c in zip(block[1], block[2], strict=True)
                )
                body.append(f'<div class="figs">{figs}</div>')
        return HTML_TEMPLATE.format(title=e(self.title), body="\n".join(body))

    def write(self, out: Path, stem: str = "report") -> tuple[Path, Path]:
        md, page = out / f"{stem}.md", out / f"{stem}.html"
        md.write_text(self.markdown())
        page.write_text(self.html())
        return md, page


def _inline_code(text: str) -> str:
    """Markdown's `code` spans in a paragraph -> <code> (the only inline markup the report uses)."""
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ margin-top: 1.8em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }}
th, td {{ border: 1px solid #ddd; padding: 3px 9px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} thead {{ background: #f4f4f4; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; }}
img {{ max-width: 100%; border: 1px solid #eee; }} figcaption {{ font-size: 0.85em; color: #555; }}
code {{ background: #f4f4f4; padding: 0 3px; }}
</style></head><body>
{body}
</body></html>
"""
