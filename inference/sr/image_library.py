"""TID 1600 Image Library of a report, built from the source headers.

highdicom's ImageLibrary repeats every TID 1602/1604 descriptor in every entry: for a
60-slice series about 1000 content items, which dominated the time to build, copy,
check and encode the report. Here images are grouped (TID 1600 row 2) and the
descriptors a group shares are stated once on the group (row 3); each entry (TID 1601)
carries only those that differ. Images whose descriptors highdicom cannot build, or
that hold a descriptor not in the tables below, keep highdicom's layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from inference.codes import code_key, concept_key

__all__ = ["DESCRIPTOR_ATTRIBUTES", "image_library"]

_CROSS_SECTIONAL_MODALITIES = ("CT", "MR", "PT")
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")

# The concept name highdicom gives each image of its library (TID 1601 row 1).
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")

# TID 1602-1604 descriptors that highdicom builds, by concept (scheme, code value): the header
# attribute each one is read from and the index in a multi-valued attribute (None: the value).
DESCRIPTOR_ATTRIBUTES: dict[tuple[str, str], tuple[str, int | None]] = {
    code_key(code): attribute
    for code, attribute in (
        (codes.DCM.Modality, ("SOPClassUID", None)),  # coded from the SOP class
        (codes.DCM.FrameOfReferenceUID, ("FrameOfReferenceUID", None)),
        (codes.DCM.PixelDataRows, ("Rows", None)),
        (codes.DCM.PixelDataColumns, ("Columns", None)),
        (codes.DCM.PatientOrientationRow, ("PatientOrientation", 0)),
        (codes.DCM.PatientOrientationColumn, ("PatientOrientation", 1)),
        (codes.DCM.SliceThickness, ("SliceThickness", None)),
        (codes.DCM.SpacingBetweenSlices, ("SpacingBetweenSlices", None)),
        (codes.DCM.ImagePositionPatientX, ("ImagePositionPatient", 0)),
        (codes.DCM.ImagePositionPatientY, ("ImagePositionPatient", 1)),
        (codes.DCM.ImagePositionPatientZ, ("ImagePositionPatient", 2)),
        (codes.DCM.ImageOrientationPatientRowX, ("ImageOrientationPatient", 0)),
        (codes.DCM.ImageOrientationPatientRowY, ("ImageOrientationPatient", 1)),
        (codes.DCM.ImageOrientationPatientRowZ, ("ImageOrientationPatient", 2)),
        (codes.DCM.ImageOrientationPatientColumnX, ("ImageOrientationPatient", 3)),
        (codes.DCM.ImageOrientationPatientColumnY, ("ImageOrientationPatient", 4)),
        (codes.DCM.ImageOrientationPatientColumnZ, ("ImageOrientationPatient", 5)),
    )
}
# Pixel spacing: PixelSpacing for cross-sectional images, ImagerPixelSpacing for projection ones.
_SPACING_CONCEPTS = {
    code_key(codes.DCM.HorizontalPixelSpacing): 1,
    code_key(codes.DCM.VerticalPixelSpacing): 0,
}


def _has_modality_descriptors(image: Dataset) -> bool:
    """Whether highdicom's TID 1603/1604 descriptors can be built for the image."""
    modality = image.get("Modality")
    if modality in _CROSS_SECTIONAL_MODALITIES:
        return all(image.get(kw) not in (None, "") for kw in (
            "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"
        ))
    if modality in _PROJECTION_MODALITIES:
        orientation = image.get("PatientOrientation")
        return (
            orientation is not None
            and len(orientation) == 2
            and image.get("ImagerPixelSpacing") not in (None, "")
        )
    return True


def _library_header(image: Dataset) -> Dataset:
    """The header the image library entry (TID 1601) is built from.

    CR images often lack PatientOrientation or ImagerPixelSpacing, which
    highdicom's projection radiography descriptors need; such images are listed
    with the basic descriptors only (modality from the SOP class, rows, columns).
    """
    if _has_modality_descriptors(image):
        return image
    header = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in image:
            setattr(header, keyword, image.get(keyword))
    header.Modality = "OT"  # selects neither modality-specific branch
    return header


def _descriptor_value(header: Dataset, key: tuple[str, str]) -> object:
    """The header value behind one descriptor (KeyError for a descriptor not in the tables)."""
    if key in _SPACING_CONCEPTS:
        projection = header.get("Modality") in _PROJECTION_MODALITIES
        keyword = "ImagerPixelSpacing" if projection else "PixelSpacing"
        return header.get(keyword)[_SPACING_CONCEPTS[key]]
    keyword, index = DESCRIPTOR_ATTRIBUTES[key]
    value = header.get(keyword)
    return value if index is None else value[index]


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return str(a) == str(b)


def _descriptor_like(template: Dataset, value: object) -> Dataset:
    """A copy of ``template`` (a highdicom NUM or TEXT descriptor) holding ``value``."""
    relationship = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    if isinstance(template, hd.sr.NumContentItem):
        return hd.sr.NumContentItem(
            name=template.name, value=value, unit=template.unit, relationship_type=relationship
        )
    return hd.sr.TextContentItem(
        name=template.name, value=str(value), relationship_type=relationship
    )


def _factor_descriptors(
    template: Sequence[Dataset], headers: Sequence[Dataset]
) -> tuple[list[Dataset], list[tuple[int, list[object]]]] | None:
    """Split the descriptors of ``template`` (those of ``headers[0]``) into the items every
    header shares and, per differing descriptor, its position and each header's value.
    None when a descriptor is not in the tables above or differs but is not NUM or TEXT."""
    try:
        values = [[_descriptor_value(h, concept_key(item)) for h in headers] for item in template]
    except (KeyError, TypeError, IndexError):
        return None
    shared, varying = [], []
    for position, (item, column) in enumerate(zip(template, values)):
        if all(_same_value(column[0], value) for value in column[1:]):
            shared.append(item)
        elif isinstance(item, (hd.sr.NumContentItem, hd.sr.TextContentItem)):
            varying.append((position, column))
        else:
            return None
    return shared, varying


def _library_group(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """One Image Library Group (TID 1600 row 2) of images that share SOP class, modality,
    frame of reference and descriptor layout.

    The descriptors all the group's images share (modality, frame of reference, matrix,
    pixel spacing, orientation, thickness) are stated once on the group (TID 1600 row 3),
    and each entry (TID 1601) carries only those that differ (the slice position): the
    same information, from the headers already read. The items are highdicom's
    descriptors of the group's first image.
    """
    template = list(hd.sr.ImageLibraryEntryDescriptors(headers[0]))
    factored = _factor_descriptors(template, headers)
    shared, varying = factored if factored is not None else ([], [])
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    content = hd.sr.ContentSequence(shared)
    for index, header in enumerate(headers):
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        if factored is None:  # highdicom's layout: every descriptor in every entry
            descriptors = list(hd.sr.ImageLibraryEntryDescriptors(header))
        else:
            descriptors = [_descriptor_like(template[p], column[index]) for p, column in varying]
        if descriptors:
            image.ContentSequence = hd.sr.ContentSequence(descriptors)
        content.append(image)
    group.ContentSequence = content
    return group


def image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library of ``images``, from their headers (pixel data is not touched).

    A single image is listed as highdicom lists it. Several images are grouped by SOP class,
    frame of reference and descriptor layout, with their shared descriptors on the group
    (see :func:`_library_group`).
    """
    headers = [_library_header(image) for image in images]
    if len(headers) == 1:
        (library,) = hd.sr.ImageLibrary(headers)
        return library
    groups: dict[tuple, list[Dataset]] = {}
    for header in headers:
        key = (
            str(header.SOPClassUID),
            str(header.get("Modality", "")),
            str(header.get("FrameOfReferenceUID", "")),
            "SpacingBetweenSlices" in header,
        )
        groups.setdefault(key, []).append(header)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([_library_group(g) for g in groups.values()])
    return library
