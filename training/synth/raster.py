"""Rasterisation for the radiograph phantom: blur, noise, resampling and the body-unit canvas.

The canvas maps body coordinates (u right-of-image, v down; 1 unit = half the thorax width)
onto a slightly rotated pixel grid; anatomy, findings and devices are drawn on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian blur via FFT (fine: the canvases have empty margins)."""
    if sigma_px <= 0.0:
        return img
    fy = np.fft.fftfreq(img.shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(img.shape[1]).astype(np.float32)[None, :]
    transfer = np.exp(np.float32(-2.0 * (np.pi * sigma_px) ** 2) * (fx**2 + fy**2))
    spectrum = np.fft.rfft2(img.astype(np.float32, copy=False)) * transfer
    return np.fft.irfft2(spectrum, s=img.shape).astype(np.float32, copy=False)


def soften_lines(layer: np.ndarray, sigma_px: float) -> np.ndarray:
    """Blur 1-px splatted lines, keeping their peak value (a line's profile integrates to 1 px)."""
    sigma_px = max(sigma_px, 0.5)
    return _gaussian_blur(layer, sigma_px) * float(np.sqrt(2.0 * np.pi) * sigma_px)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ~sigma_px."""
    field_ = _gaussian_blur(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def resize_bilinear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if img.shape == shape:
        return img
    out = img
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (pos - lo).astype(np.float32)
        a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        w = w[:, None] if axis == 0 else w[None, :]
        out = a * (1 - w) + b * w
    return out.astype(np.float32)


@dataclass(frozen=True)
class Canvas:
    """Pixel grid mapped to body units (1 unit = half the thorax width), slightly rotated."""

    n: int
    u0: float
    v0: float
    unit_per_px: float
    cos: float
    sin: float
    u: np.ndarray = field(repr=False)
    v: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, n: int, u0: float, v0: float, unit_per_px: float, angle: float) -> Canvas:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        d = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0)
        dc, dr = d[None, :], d[:, None]
        u = (u0 + unit_per_px * (c * dc + s * dr)).astype(np.float32)
        v = (v0 + unit_per_px * (-s * dc + c * dr)).astype(np.float32)
        return cls(n, u0, v0, unit_per_px, c, s, u, v)

    def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        du, dv = (u - self.u0) / self.unit_per_px, (v - self.v0) / self.unit_per_px
        col = self.cos * du - self.sin * dv + (self.n - 1) / 2.0
        row = self.sin * du + self.cos * dv + (self.n - 1) / 2.0
        return row, col

    def window(self, cu: float, cv: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel bounding box of a disc in body units, or None when off-canvas."""
        row, col = self.to_pixels(np.array(cu), np.array(cv))
        rad = radius / self.unit_per_px + 2
        r0, r1 = int(max(row - rad, 0)), int(min(row + rad + 1, self.n))
        c0, c1 = int(max(col - rad, 0)), int(min(col + rad + 1, self.n))
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def stamp(img: np.ndarray, cv: Canvas, cu: float, cvv: float, radius: float,
          profile: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Add profile(du, dv) around (cu, cvv) into img, touching only the bounding box."""
    win = cv.window(cu, cvv, radius)
    if win is not None:
        img[win] += profile(cv.u[win] - cu, cv.v[win] - cvv)


def splat_polyline(layer: np.ndarray, cv: Canvas, points: np.ndarray, value: float) -> None:
    """Rasterise a polyline (N×2 body units) as 1-px dots; blur the layer afterwards."""
    seg = np.diff(points, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    steps = np.maximum((lengths / (0.5 * cv.unit_per_px)).astype(int), 1)
    dense = np.concatenate(
        [p + np.linspace(0.0, 1.0, k, endpoint=False)[:, None] * d for p, d, k in zip(points[:-1], seg, steps)]
        + [points[-1:]]
    )
    row, col = cv.to_pixels(dense[:, 0], dense[:, 1])
    row, col = np.rint(row).astype(int), np.rint(col).astype(int)
    ok = (row >= 0) & (row < cv.n) & (col >= 0) & (col < cv.n)
    np.maximum.at(layer, (row[ok], col[ok]), value)


def curve(points: Sequence[tuple[float, float]], n: int = 48) -> np.ndarray:
    """A smooth curve through control points (Catmull-Rom), as an n×2 polyline."""
    p = np.asarray(points, dtype=float)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(p) - 2):
        t = np.linspace(0.0, 1.0, max(n // (len(p) - 3), 4), endpoint=False)[:, None]
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    out.append(p[-2:-1])
    return np.vstack(out)


def thickness(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float,
              p: float = 2.0) -> np.ndarray:
    """Path length through a superellipsoid (0 outside, 1 at the centre)."""
    r = (np.abs((u - cu) / au) ** p + np.abs((v - cv) / av) ** p) ** (1.0 / p)
    return np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
