"""Support devices on neonatal radiographs: lines, tubes and electrodes."""

from __future__ import annotations

import numpy as np

from training.synth.chest_anatomy import Body
from training.synth.raster import Canvas, curve, soften_lines, splat_polyline, stamp


def support_devices(rng: np.random.Generator, cv: Canvas, body: Body) -> tuple[np.ndarray, list[str]]:
    """ETT, oro-gastric tube, UVC, UAC and ECG electrodes as a density layer."""
    wide, thin, snaps = np.zeros_like(cv.u), np.zeros_like(cv.u), np.zeros_like(cv.u)
    present: list[str] = []
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731
    if body.adult:
        return wide, present
    if rng.random() < 0.6:
        tip = (0.01 + j(0.02), -0.62 + j(0.08))
        splat_polyline(wide, cv, curve([(0.05, -2.4), (0.03 + j(0.02), -1.4), tip]), 1.0)
        present.append("ETT")
    if rng.random() < 0.6:
        stomach = (0.3 + j(0.05), body.diaphragm[1] + 0.35)
        splat_polyline(thin, cv, curve([(-0.04, -2.4), (0.0, -1.0), (0.04, 0.2), stomach]), 0.8)
        present.append("OGT")
    if rng.random() < 0.5:
        tip = (-0.08 + j(0.03), 0.22 + j(0.1))
        splat_polyline(thin, cv, curve([(0.02, 3.6), (0.0, 2.3), (-0.18, 1.4), (-0.14, 0.7), tip]), 0.9)
        present.append("UVC")
    if rng.random() < 0.4:
        tip = (0.05 + j(0.02), -0.05 + j(0.15))
        splat_polyline(thin, cv, curve([(-0.02, 3.6), (0.0, 2.3), (0.16, 2.95), (0.06, 2.5), (0.05, 1.0), tip]), 0.9)
        present.append("UAC")
    if rng.random() < 0.7:
        for _ in range(int(rng.integers(2, 4))):
            cu, cvv = rng.uniform(-0.9, 0.9), rng.uniform(-0.6, 1.8)
            stamp(snaps, cv, cu, cvv, 0.1, lambda du, dv: 0.2 * np.exp(-(((np.hypot(du, dv) - 0.06) / 0.008) ** 2))
                  + 0.35 * np.exp(-((np.hypot(du, dv) / 0.015) ** 2)))
        present.append("ECG")
    layer = (0.3 * soften_lines(wide, 0.01 / cv.unit_per_px)
             + 0.25 * soften_lines(thin, 0.005 / cv.unit_per_px) + snaps)
    return layer, present
