"""Input similarity for near-duplicate detection: images re-aligned by small shifts and a zoom and
compared by Pearson correlation, vectors standardized, text by hashed character trigrams; and the kinds
of change (variants) the threshold is calibrated against."""

from __future__ import annotations

import random
import zlib

import torch
import torch.nn.functional as F


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(n, C, H, W) images moved by (dy, dx) pixels, the edge filled with zeros."""
    h, w, s = img.shape[-2], img.shape[-1], max(abs(dy), abs(dx))
    return F.pad(img, (s, s, s, s))[..., s - dy : s - dy + h, s - dx : s - dx + w]


def _zoom(img: torch.Tensor, m: int) -> torch.Tensor:
    """m > 0: the centre without an m-pixel border, enlarged back to size; m < 0: shrunk inside one."""
    h, w = img.shape[-2:]
    if m > 0:
        return F.interpolate(img[..., m : h - m, m : w - m], size=(h, w), mode="bilinear", align_corners=False)
    inner = F.interpolate(img, size=(h + 2 * m, w + 2 * m), mode="bilinear", align_corners=False, antialias=True)
    return F.pad(inner, (-m, -m, -m, -m))


def aligned(x: torch.Tensor, image_shape: list[int] | None) -> torch.Tensor:
    """(A, n, d): the inputs x (n, d) and, for images, their small re-alignments: shifts of up to
    max(1, H // 16) pixels each way, and a zoom in and out by max(1, H // 8) pixels per side."""
    if not image_shape:
        return x[None]
    img = x.reshape(len(x), -1, *image_shape[-2:])
    s, m = max(1, img.shape[-2] // 16), max(1, img.shape[-2] // 8)
    views = [_shift(img, dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)] + [
        _zoom(img, m),
        _zoom(img, -m),
    ]
    return torch.stack([v.reshape(len(x), -1) for v in views])


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm: their dot products are Pearson correlations."""
    v = v - v.mean(-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Similarity:
    """Input-space similarity to a training set's records: the largest Pearson correlation of the two
    inputs when either is re-aligned (images, as they are: `aligned`) or of the features standardized by
    the training set's spread (other vectors, whose features have their own units; `standardize=False`
    keeps them: text profiles). 1 = the same up to brightness and contrast; symmetric, so a changed copy
    is found whichever side was changed."""

    def __init__(self, train: torch.Tensor, image_shape: list[int] | None, standardize: bool = True):
        self.image_shape, train = image_shape, train.flatten(1).float()
        standardize = standardize and not image_shape
        self.mean, self.std = (train.mean(0), train.std(0).clamp_min(1e-12)) if standardize else (0.0, 1.0)
        self.train = self.scaled(train)

    @classmethod
    def of_spread(cls, mean: torch.Tensor, std: torch.Tensor, image_shape: list[int] | None) -> Similarity:
        """For pairs only (`pairs`, `scaled`): features standardized by a spread measured before (an index's
        sample of the training set: worker/leakage.py) instead of the whole set's."""
        out = cls.__new__(cls)
        out.image_shape, out.mean, out.std, out.train = image_shape, mean, std, None
        return out

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).float() - self.mean) / self.std

    def _both(self, x: torch.Tensor, x_aligned: torch.Tensor, y: torch.Tensor, pair) -> torch.Tensor:
        """The larger of pair(aligned x, y) and pair(x, aligned y), over the alignments (x, x_aligned: unit)."""
        one = pair(x_aligned, _unit(y)).amax(0)
        return torch.maximum(one, pair(x, _unit(aligned(y, self.image_shape))).amax(0))

    def __call__(self, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """(rows, N) each query's similarity with every training record."""
        x = self.scaled(x)
        x_unit, x_aligned = _unit(x), _unit(aligned(x, self.image_shape))  # once, for every block
        blocks = self.train.split(block)
        return torch.cat([self._both(x_unit, x_aligned, t, lambda a, b: a @ b.mT) for t in blocks], dim=1)

    def pairs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n,) the similarity of x[i] with y[i]."""
        x = self.scaled(x)
        return self._both(_unit(x), _unit(aligned(x, self.image_shape)), self.scaled(y), lambda a, b: (a * b).sum(-1))


def variants(x: torch.Tensor, image_shape: list[int] | None, lo: float, hi: float) -> dict[str, torch.Tensor]:
    """Changed versions of records x (n, d) that a leak typically is: pixel noise (5% of the input range),
    brightness (x 0.7), contrast (x 0.7 about the mean) and, for images, a 1-pixel shift and a crop."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    mean = x.mean(1, keepdim=True)
    out = {
        "noise": (x + 0.05 * (hi - lo) * noise).clamp(lo, hi),
        "brightness": lo + (x - lo) * 0.7,
        "contrast": mean + (x - mean) * 0.7,
    }
    if image_shape:
        img = x.reshape(len(x), -1, *image_shape[-2:])
        out["shift"] = _shift(img, 1, 0).reshape(x.shape)
        out["crop"] = _zoom(img, max(1, img.shape[-2] // 8)).reshape(x.shape)
    return out


def text_profile(texts: list[str], buckets: int = 4096) -> torch.Tensor:
    """(n, buckets) counts of each text's character trigrams, hashed, after case folding and with runs
    of whitespace as one space: texts that differ only in case or spacing have the same profile."""
    out = torch.zeros(len(texts), buckets)
    for i, text in enumerate(texts):
        text = " ".join(text.casefold().split())
        for j in range(max(1, len(text) - 2)):
            out[i, zlib.crc32(text[j : j + 3].encode()) % buckets] += 1
    return out


def text_variants(texts: list[str]) -> dict[str, list[str]]:
    """Changed versions of texts that a leak typically is: upper case, other spacing, one word replaced
    by another word of the texts (seeded)."""
    rng = random.Random(0)
    words = sorted({w for t in texts for w in t.split()}) or [""]

    def one_word(text: str) -> str:
        w = text.split() or [""]
        w[rng.randrange(len(w))] = rng.choice(words)
        return " ".join(w)

    return {
        "case": [t.upper() for t in texts],
        "whitespace": ["  ".join(t.split()) + " \n" for t in texts],
        "word": [one_word(t) for t in texts],
    }
