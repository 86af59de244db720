"""Detection metrics (scikit-learn): AUC with a bootstrap interval, AP, accuracies, TPR at low FPR, per generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from semspai.pipeline.config import BOOTSTRAP_ROUNDS

# The keys of one metrics block, in DESIGN.md's order (plus the AUC interval).
METRIC_KEYS = (
    "auc",
    "ap",
    "acc_at_0_5",
    "acc_at_threshold",
    "tpr_at_1_fpr",
    "tpr_at_5_fpr",
    "n_real",
    "n_fake",
    "threshold",
    "auc_ci",
)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """The highest TPR among ROC operating points whose FPR is at most `max_fpr` (no interpolation, so
    the value is one a real threshold achieves)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row by the Mann-Whitney rank sum (ties count half), vectorised over rows: equal to
    scikit-learn's `roc_auc_score`, which costs milliseconds a call and so cannot serve a 1000-round bootstrap.

    labels: (L,) 0/1; scores: (R, L) -> (R,)
    """
    ranks = rankdata(scores, axis=1)  # (R, L), average ranks for ties
    n_fake = int(labels.sum())
    n_real = labels.size - n_fake
    return (ranks[:, labels == 1].sum(axis=1) - n_fake * (n_fake + 1) / 2) / (n_real * n_fake)


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Percentile interval of AUC over resamples drawn within each class (stratified), so every resample has
    both classes and the class balance of the test set."""
    rng = np.random.default_rng(seed)
    real, fake = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picks = np.concatenate([rng.choice(real, (rounds, real.size)), rng.choice(fake, (rounds, fake.size))], axis=1)
    y = np.concatenate([np.zeros(real.size, np.int64), np.ones(fake.size, np.int64)])
    aucs = rank_auc(y, scores[picks])  # (rounds,)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))]


def binary_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> dict:
    """One metrics block M for scores = P(fake) and labels 1 = fake. Values that need both classes are None
    when a class is missing (JSON has no NaN)."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_real, n_fake = int((y == 0).sum()), int((y == 1).sum())
    out: dict = dict.fromkeys(METRIC_KEYS)
    out.update(n_real=n_real, n_fake=n_fake, threshold=float(threshold))
    if y.size:
        out["acc_at_0_5"] = float(((s >= 0.5) == y).mean())
        out["acc_at_threshold"] = float(((s >= threshold) == y).mean())
    if n_real and n_fake:
        out.update(
            auc=float(roc_auc_score(y, s)),
            ap=float(average_precision_score(y, s)),
            tpr_at_1_fpr=tpr_at_fpr(y, s, 0.01),
            tpr_at_5_fpr=tpr_at_fpr(y, s, 0.05),
            auc_ci=bootstrap_auc_ci(y, s, rounds, seed),
        )
    return out


def evaluate_scores(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    generators: Sequence[str],
    threshold: float,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> dict:
    """`{"overall": M, "per_generator": {gen: M}}`; each generator's fakes are scored against ALL reals of the
    split (SPAI's protocol), since reals have no generator of their own."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(generators, dtype=object)
    real = y == 0
    per_gen = {}
    for gen in sorted(set(g[y == 1])):
        keep = real | ((y == 1) & (g == gen))
        per_gen[gen] = binary_metrics(y[keep], s[keep], threshold, rounds, seed)
    return {"overall": binary_metrics(y, s, threshold, rounds, seed), "per_generator": per_gen}


def per_format(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, formats: Sequence[str],
               threshold: float, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict[str, dict]:  # fmt: skip
    """`{format: M}`: the metrics of each file format's images alone (reals and fakes of that format), so a
    score that follows the format (JPEG reals, PNG fakes) shows as a high AUC overall and none within a format."""
    y, s, f = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64), np.asarray(formats, object)
    return {fmt: binary_metrics(y[f == fmt], s[f == fmt], threshold, rounds, seed) for fmt in sorted(set(f))}


def format_confound(by_format: dict[str, dict]) -> str:
    """Why the overall figures may measure the file format ('' when they cannot): with several formats, none of
    them holds both reals and fakes."""
    if len(by_format) < 2 or any(m["n_real"] and m["n_fake"] for m in by_format.values()):
        return ""
    held = {kind: ", ".join(f for f, m in by_format.items() if m[f"n_{kind}"]) for kind in ("real", "fake")}
    return (f"no file format holds both classes (real: {held['real']}; fake: {held['fake']}): the AUC may measure "
            "the format's compression, not generation traces; --perturb jpeg:... scores every image re-encoded alike")  # fmt: skip


def clip_score_per_image(image_vecs: np.ndarray, caption_vecs: np.ndarray) -> np.ndarray:
    """(N,) CLIP score, 100 x the cosine of each image's vector and its caption's; NaN where a row is NaN (no
    caption)."""
    a = image_vecs / np.linalg.norm(image_vecs, axis=1, keepdims=True)
    b = caption_vecs / np.linalg.norm(caption_vecs, axis=1, keepdims=True)
    return 100.0 * (a * b).sum(axis=1)


def clip_score_groups(score: np.ndarray, labels: Sequence[int], generators: Sequence[str]) -> dict[str, dict]:
    """Mean CLIP score and count per class and per fake generator; NaN scores (no caption) are left out."""
    y, g, ok = np.asarray(labels), np.asarray(generators, dtype=object), np.isfinite(score)
    groups = {"real": ok & (y == 0), "fake": ok & (y == 1)}
    groups |= {f"fake/{gen}": ok & (y == 1) & (g == gen) for gen in sorted(set(g[y == 1]))}
    return {name: {"clip_score": float(score[m].mean()), "n": int(m.sum())} for name, m in groups.items() if m.any()}


def clip_scores(
    image_vecs: np.ndarray, caption_vecs: np.ndarray, labels: Sequence[int], generators: Sequence[str]
) -> dict[str, dict]:
    """CLIP score (100 x cosine of image and caption vectors), mean and count per class and per fake generator.

    image_vecs, caption_vecs: (N, D); rows with no caption are rows of NaN and are left out.
    """
    return clip_score_groups(clip_score_per_image(image_vecs, caption_vecs), labels, generators)
