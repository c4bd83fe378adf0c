"""Neonatal chest MR: the phantom (geometry, anatomy, lung labels, T2-like image) and its series.

The geometry is exact: `labels[k]` overlays slice k voxel for voxel, so a reference SEG built
from the labels matches its series and the true lung volumes follow from the voxel counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from training.synth.attributes import (MAX_STORED, common_attributes, decimal_string, dicom_date, dicom_time,
                                       file_meta, image_pixel, voi_window)
from training.synth.patients import SynthStudy, random_neonatal_study, synth_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
LEFT_LUNG, RIGHT_LUNG = 1, 2  # label values in MR label volumes and SEG segment numbers


@dataclass(frozen=True)
class _MrGeometry:
    shape: tuple[int, int, int]  # slices, rows, columns
    pixel_spacing: float         # mm, square pixels
    slice_spacing: float         # mm, centre to centre
    slice_thickness: float
    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0 (LPS, mm)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS coordinates of the voxel centres as broadcastable (z, y, x) arrays."""
        s, r, c = self.shape
        x = self.origin[0] + self.pixel_spacing * np.arange(c, dtype=np.float32)
        y = self.origin[1] + self.pixel_spacing * np.arange(r, dtype=np.float32)
        z = self.origin[2] + self.slice_spacing * np.arange(s, dtype=np.float32)
        return z[:, None, None], y[None, :, None], x[None, None, :]

    @property
    def voxel_ml(self) -> float:
        return self.pixel_spacing**2 * self.slice_spacing / 1000.0


def _mr_geometry(rng: np.random.Generator, shape: tuple[int, int, int]) -> _MrGeometry:
    s, r, c = shape
    # Field of view ~14–17 cm in-plane, ~8–12 cm through-plane regardless of matrix size.
    pixel_spacing = round(float(rng.uniform(140, 170)) / c, 4)
    slice_spacing = round(float(rng.uniform(80, 110)) / s, 3)
    thickness = round(slice_spacing * float(rng.choice([0.9, 1.0])), 3)
    origin = (-(c - 1) / 2 * pixel_spacing + float(rng.normal(0, 2)),
              -(r - 1) / 2 * pixel_spacing + float(rng.normal(0, 2)),
              -(s - 1) / 2 * slice_spacing + float(rng.normal(0, 3)))
    return _MrGeometry(shape, pixel_spacing, slice_spacing, thickness, tuple(round(o, 3) for o in origin))


@dataclass(frozen=True)
class _MrAnatomy:
    body_rx: float
    body_ry: float
    lung_base: float
    lung_height: tuple[float, float]     # (left, right)
    lung_centre: tuple[tuple[float, float], tuple[float, float]]
    lung_radii: tuple[tuple[float, float], tuple[float, float]]
    dome: tuple[float, float]
    warp: tuple[tuple[float, ...], tuple[float, ...]]
    heart: tuple[float, float, float, float, float, float]


def _mr_anatomy(rng: np.random.Generator) -> _MrAnatomy:
    size = float(rng.uniform(0.8, 1.2))  # overall scale: preterm to term
    lung_height = tuple(float(rng.uniform(42, 62) * size) for _ in range(2))

    def warp() -> tuple[float, ...]:
        return tuple(float(x) for x in np.concatenate([rng.normal(0, 0.07, 3), rng.uniform(0, 2 * np.pi, 3)]))

    return _MrAnatomy(
        body_rx=float(rng.uniform(46, 56) * size), body_ry=float(rng.uniform(34, 42) * size),
        lung_base=float(rng.uniform(-32, -18)),
        lung_height=lung_height,  # type: ignore[arg-type]
        lung_centre=((float(rng.uniform(21, 27) * size), float(rng.uniform(-2, 4))),
                     (float(-rng.uniform(21, 27) * size), float(rng.uniform(-2, 4)))),
        lung_radii=((float(rng.uniform(14, 20) * size), float(rng.uniform(21, 28) * size)),
                    (float(rng.uniform(16, 22) * size), float(rng.uniform(22, 29) * size))),
        dome=(float(rng.uniform(6, 13)), float(rng.uniform(8, 15))),
        warp=(warp(), warp()),
        heart=(float(rng.uniform(4, 9)), float(rng.uniform(-16, -10)), float(rng.uniform(12, 20)),
               float(rng.uniform(13, 17) * size), float(rng.uniform(11, 14) * size), float(rng.uniform(12, 16))),
    )


def _mr_lung_labels(geom: _MrGeometry, anat: _MrAnatomy) -> np.ndarray:
    """Label volume (slices, rows, cols): 0 background, 1 left lung, 2 right lung."""
    z, y, x = geom.axes()
    hx, hy, hz, hrx, hry, hrz = anat.heart
    hz = anat.lung_base + hz
    heart = ((x - hx) / (hrx + 2)) ** 2 + ((y - hy) / (hry + 2)) ** 2 + ((z - hz) / (hrz + 2)) ** 2 < 1  # + margin
    spine = (x / 10.0) ** 2 + ((y - anat.body_ry * 0.72) / 10.0) ** 2 < 1
    labels = np.zeros(geom.shape, np.uint8)
    for i, value in enumerate((LEFT_LUNG, RIGHT_LUNG)):
        (cx, cy), (rx, ry), w = anat.lung_centre[i], anat.lung_radii[i], anat.warp[i]
        t = (z - anat.lung_base) / anat.lung_height[i]  # 0 at the base, 1 at the apex
        taper = np.clip(1.0 - t, 0.0, 1.0) ** 0.55 * (1.0 + 0.15 * np.clip(t, 0, 1))
        qx, qy = (x - cx) / rx, (y - cy) / ry
        theta = np.arctan2(qy, qx * np.sign(cx))
        wobble = (1.0 + w[0] * np.sin(2 * theta + w[3] + 0.03 * z) + w[1] * np.sin(3 * theta + w[4])
                  + w[2] * np.sin(4 * theta + w[5]))
        radial = np.sqrt(qx**2 + qy**2) / wobble
        above_dome = (z - anat.lung_base) > anat.dome[i] * np.clip(1.0 - radial**2, 0.0, 1.0)
        inside = (radial < taper) & above_dome & (t >= 0) & (t <= 1) & (np.sign(x) == np.sign(cx)) & (np.abs(x) > 4.0)
        labels[inside & ~heart & ~spine & (labels == 0)] = value
    return labels


def _mr_image(rng: np.random.Generator, geom: _MrGeometry, anat: _MrAnatomy, labels: np.ndarray) -> np.ndarray:
    """T2-weighted-looking magnitude volume with bias field, ghosting and Rician noise."""
    z, y, x = geom.axes()
    body_r = np.sqrt((x / anat.body_rx) ** 2 + ((y - 2.0) / anat.body_ry) ** 2)
    neck = np.clip(1.0 - np.clip(z - (anat.lung_base + max(anat.lung_height) + 8), 0, None) / 40.0, 0.45, 1.0)
    body = body_r < neck
    fat = body & (body_r > neck - 3.5 / anat.body_rx)
    img = np.where(body, 420.0, 0.0).astype(np.float32)
    img[fat] = 900.0
    hx, hy, hz, hrx, hry, hrz = anat.heart
    heart = ((x - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2 + ((z - (anat.lung_base + hz)) / hrz) ** 2 < 1
    img[heart & body] = 260.0
    vert = (x / 8.0) ** 2 + ((y - anat.body_ry * 0.72) / 8.0) ** 2 < 1
    canal = (x / 3.0) ** 2 + ((y - anat.body_ry * 0.72 - 9.0) / 3.0) ** 2 < 1
    img[np.broadcast_to(vert, img.shape) & body] = 520.0
    img[np.broadcast_to(canal, img.shape) & body] = 1200.0
    below = (z < anat.lung_base + 2) & body & ~np.broadcast_to(vert | canal, img.shape)
    img[below & (x < 0)] = 380.0  # liver
    img[labels > 0] = 55.0
    vessels = (_smooth_noise_3d(rng, geom.shape, 1.2) > 2.2) & (labels > 0)
    img[vessels] = 180.0
    bias = 1.0 + 0.15 * (x / 80.0) - 0.12 * (y / 80.0) + 0.05 * (z / 60.0)
    img = _blur_inplane(img * bias.astype(np.float32), 0.6)
    return _mr_acquire(rng, img)


def _smooth_noise_3d(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float) -> np.ndarray:
    noise = _blur_inplane(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _blur_inplane(vol: np.ndarray, sigma_px: float) -> np.ndarray:
    fy = np.fft.fftfreq(vol.shape[1])[None, :, None]
    fx = np.fft.rfftfreq(vol.shape[2])[None, None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(vol) * transfer, s=vol.shape[1:]).astype(np.float32)


def _mr_acquire(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Motion ghosting along the phase-encode (column) direction, then Rician noise."""
    n = img.shape[1]
    kspace = np.fft.fft(img, axis=1)
    every = int(rng.integers(3, 7))
    shift_px = float(rng.uniform(0.5, 2.0))
    ky = np.fft.fftfreq(n)
    phase = np.where(np.arange(n) % every == 0, np.exp(-2j * np.pi * ky * shift_px), 1.0)
    ghosted = np.fft.ifft(kspace * phase[None, :, None], axis=1)
    sigma = float(rng.uniform(10, 22))
    noisy = ghosted + sigma * (rng.standard_normal(img.shape) + 1j * rng.standard_normal(img.shape))
    return np.clip(np.rint(np.abs(noisy)), 0, MAX_STORED).astype(np.uint16)


def _mr_slice(study: SynthStudy, geom: _MrGeometry, pixels: np.ndarray, k: int, acquired: dt.datetime) -> Dataset:
    """One MR Image Storage instance of the series; slice k steps along the normal (+z)."""
    ds = Dataset()
    common_attributes(ds, study, modality="MR", sop_class_uid=MR_IMAGE_STORAGE,
                      sop_instance_uid=synth_uid(study.series_instance_uid, "image", k + 1),
                      series_number=1, instance_number=k + 1, description="T2 TSE AX LUNG",
                      model="synth-mr", created=acquired + dt.timedelta(minutes=5))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.AcquisitionDate, ds.AcquisitionTime = dicom_date(acquired), dicom_time(acquired)
    ds.ContentDate, ds.ContentTime = dicom_date(acquired), dicom_time(acquired)
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "tse2d1_17"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2200", "95", 17
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = "63.6"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "1.5"
    ds.FlipAngle = "150"
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.SliceThickness = decimal_string(geom.slice_thickness)
    ds.SpacingBetweenSlices = decimal_string(geom.slice_spacing)
    ds.PixelSpacing = [decimal_string(geom.pixel_spacing), decimal_string(geom.pixel_spacing)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    z = geom.origin[2] + k * geom.slice_spacing
    ds.ImagePositionPatient = [decimal_string(x, 8) for x in (geom.origin[0], geom.origin[1], z)]
    ds.SliceLocation = decimal_string(z, 8)
    ds.FrameOfReferenceUID = synth_uid(study.series_instance_uid, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = geom.shape[0]
    image_pixel(ds, pixels, "MONOCHROME2")
    voi_window(ds, pixels, "SYNTHETIC DEFAULT")
    return file_meta(ds)


def make_mr_series(
    rng: np.random.Generator,
    *,
    study: SynthStudy | None = None,
    shape: tuple[int, int, int] = (40, 128, 128),
) -> tuple[list[Dataset], np.ndarray]:
    """An axial neonatal chest MR series and its label volume (0 bg, 1 left lung, 2 right lung).

    `labels[k]` overlays `series[k]` (InstanceNumber k+1) voxel for voxel.
    """
    study = study or random_neonatal_study(rng)
    geom = _mr_geometry(rng, shape)
    anat = _mr_anatomy(rng)
    labels = _mr_lung_labels(geom, anat)
    image = _mr_image(rng, geom, anat, labels)
    acquired = study.study_datetime + dt.timedelta(minutes=2)
    series = [_mr_slice(study, geom, image[k], k, acquired) for k in range(shape[0])]
    return series, labels


def lung_volumes_ml(series: Sequence[Dataset], labels: np.ndarray) -> dict[str, float]:
    """True lung volumes: voxel count × PixelSpacing² × SpacingBetweenSlices."""
    first = series[0]
    voxel_ml = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1]) * float(first.SpacingBetweenSlices) / 1000.0
    left = float(np.count_nonzero(labels == LEFT_LUNG) * voxel_ml)
    right = float(np.count_nonzero(labels == RIGHT_LUNG) * voxel_ml)
    return {"left": round(left, 3), "right": round(right, 3), "total": round(left + right, 3)}
