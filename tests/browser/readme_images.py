"""Copy the browser test's best screenshots to docs/img/ for the README, small.

Run after ``.venv/bin/pytest -m browser tests/test_ohif.py``:
``.venv/bin/python tests/browser/readme_images.py``. Each copy is scaled to 1200 px
wide and stored with a 256-colour palette: 160 greys for the images plus 96 colours
taken from the coloured pixels (OHIF's interface, the SEG's lungs, the SR's green
outlines and labels). A palette fitted to the whole screenshot would spend its colours
on the greys and turn the small green labels grey. That keeps each copy well under
300 KB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "ohif"
DOCS = ROOT / "docs" / "img"
#: README image <- screenshot: the MR SEG beside the SR's lung outline with its
#: volume, and the CR with the SR's finding region.
COPIES = {"ohif-mr.png": "mr-03-sr.png", "ohif-cr.png": "cr-02-sr.png"}
WIDTH = 1200
GREYS, COLOURS = 160, 96
MIN_CHROMA = 16  # max - min channel above which a pixel counts as coloured
MAX_BYTES = 300_000


def _palette_image(rgb: Image.Image) -> Image.Image:
    pixels = np.asarray(rgb).reshape(-1, 3).astype(np.int16)
    palette = [(v, v, v) for v in np.linspace(0, 255, GREYS).round().astype(int)]
    coloured = pixels[pixels.max(axis=1) - pixels.min(axis=1) > MIN_CHROMA]
    if len(coloured):
        strip = Image.fromarray(coloured.astype(np.uint8).reshape(-1, 1, 3))
        fitted = strip.quantize(colors=COLOURS, method=Image.Quantize.MEDIANCUT)
        values = fitted.getpalette()[: 3 * COLOURS]
        palette += [tuple(values[i : i + 3]) for i in range(0, len(values), 3)]
    flat = [value for colour in palette[:256] for value in colour]
    image = Image.new("P", (1, 1))
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def main() -> int:
    DOCS.mkdir(parents=True, exist_ok=True)
    for target, source in COPIES.items():
        image = Image.open(ARTIFACTS / source).convert("RGB")
        height = round(image.height * WIDTH / image.width)
        small = image.resize((WIDTH, height), Image.Resampling.LANCZOS)
        small = small.quantize(palette=_palette_image(small), dither=Image.Dither.NONE)
        path = DOCS / target
        small.save(path, optimize=True)
        size = path.stat().st_size
        print(f"{path.relative_to(ROOT)} <- {source}: {size // 1024} KB")
        if size > MAX_BYTES:
            print(f"{path}: larger than {MAX_BYTES} bytes", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
