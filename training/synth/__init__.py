"""Synthetic neonatal and pediatric imaging: radiographs, chest MR series, reference lung SEGs.

`generate()` writes a small, fully synthetic archive for tests, demos and `cradle synth`:
day-1 neonatal chest radiographs (CR and DX, MONOCHROME1 and MONOCHROME2), distractors
(adult chests, laterals, abdomens, skulls, babygrams), neonatal chest MR series with a
reference lung segmentation each (DICOM SEG, "made by a reviewer"), children's films when asked
(frontal chests of 1-5 year olds with pneumonia by type, limb films with and without a fracture,
hand/wrist films at a bone age), `labels.csv` and `truth.json`. The same seed gives
byte-identical files, and adding children's films changes none of the others.

The phantoms are crude on purpose. What matters downstream is that the headers are valid
and consistent, the MR geometry is exact (each SEG frame overlays its slice voxel for
voxel), and the lung texture carries a learnable signal (BPD, pneumonia, iRDS: see
`training.synth.findings`).

Modules, by modality and phantom:

- `patients`: synthetic patients and studies, their labels and UIDs;
- `raster`, `chest_anatomy`, `findings`, `devices`, `projection`: the radiograph phantom;
- `radiograph`: CR and DX instances; `mri`: the MR phantom and MR Image Storage series;
- `bones`, `extremity`, `hand`: children's limb and hand/wrist films (fracture, bone age);
- `reference_seg`: the reviewer's lung SEG; `attributes`: DICOM attribute groups they share;
- `plan` and `archive`: planning and writing the whole data set (`generate`).

Only numpy, pydicom and highdicom: `node/` and the CLI may import this without torch.
"""

from __future__ import annotations

from training.synth.archive import LABEL_COLUMNS, SynthSummary, generate
from training.synth.attributes import INSTITUTION_NAME, SYNTHETIC_COMMENT
from training.synth.mri import LEFT_LUNG, RIGHT_LUNG, lung_volumes_ml, make_mr_series
from training.synth.patients import SynthPatient, SynthStudy, make_adult, make_neonate, make_study, synth_uid
from training.synth.plan import GENERATED_VIEW_CLASSES, VIEW_CLASSES
from training.synth.radiograph import make_cxr
from training.synth.reference_seg import make_reference_seg

__all__ = [
    "GENERATED_VIEW_CLASSES",
    "INSTITUTION_NAME",
    "LABEL_COLUMNS",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "SYNTHETIC_COMMENT",
    "VIEW_CLASSES",
    "SynthPatient",
    "SynthStudy",
    "SynthSummary",
    "generate",
    "lung_volumes_ml",
    "make_adult",
    "make_cxr",
    "make_mr_series",
    "make_neonate",
    "make_reference_seg",
    "make_study",
    "synth_uid",
]
