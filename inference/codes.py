"""Coded concepts of cradle's result objects (SNOMED CT, DICOM, UMLS and UCUM codes).

pydicom's :class:`~pydicom.sr.coding.Code` is an immutable named tuple, so these
are safe to share.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.sr.coding import Code

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "AREA",
    "BRONCHOPULMONARY_DYSPLASIA",
    "COMMENT",
    "IMAGE_VIEW",
    "LEFT_LUNG",
    "MILLILITER",
    "MRI_OF_CHEST",
    "NEGATIVE",
    "PERCENT",
    "PLAIN_CHEST_XRAY",
    "PLAIN_RADIOGRAPHY",
    "PNEUMONIA",
    "POSITIVE",
    "PROBABILITY",
    "QUALITATIVE_EVALUATIONS",
    "RIGHT_LUNG",
    "SQUARE_MILLIMETER",
    "THRESHOLD_VALUE",
    "VOLUME",
    "code_key",
    "concept_key",
]

# Findings and anatomy.
BRONCHOPULMONARY_DYSPLASIA = Code("67569000", "SCT", "Bronchopulmonary dysplasia")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")

# Procedures reported.
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PLAIN_RADIOGRAPHY = Code("168537006", "SCT", "Plain radiography")
MRI_OF_CHEST = Code("6007000", "SCT", "Magnetic resonance imaging of chest")

# Measurements, evaluations and their values.
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")
IMAGE_VIEW = Code("111031", "DCM", "Image View")
VOLUME = Code("118565006", "SCT", "Volume")
AREA = Code("42798000", "SCT", "Area")
POSITIVE = Code("10828004", "SCT", "Positive")
NEGATIVE = Code("260385009", "SCT", "Negative")
COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# Units (UCUM).
PERCENT = Code("%", "UCUM", "percent")
MILLILITER = Code("mL", "UCUM", "milliliter")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")


def code_key(code: Code) -> tuple[str, str]:
    """(coding scheme designator, code value): what identifies a code, whatever its meaning."""
    return code.scheme_designator, code.value


def concept_key(item: Dataset) -> tuple[str, str]:
    """:func:`code_key` of an SR content item's concept name."""
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)
