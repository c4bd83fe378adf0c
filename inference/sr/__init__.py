"""DICOM Structured Reports: TID 1500 Measurement Reports in Comprehensive 3D SR.

- :mod:`inference.sr.tid1500`: the report itself (observation context, image
  library, measurement groups, qualitative evaluations) and the rules that keep
  it drawable in OHIF;
- :mod:`inference.sr.image_library`: the TID 1600 Image Library, with the
  descriptors a series shares stated once;
- :mod:`inference.sr.radiograph`: :func:`~inference.sr.radiograph.cxr_report`,
  the report on a chest radiograph;
- :mod:`inference.sr.lung`: :func:`~inference.sr.lung.lung_report`, the lung
  volumes of a chest MRI series, referencing its SEG.

Viewer compatibility shapes the SR content (checked against OHIF 3.13, see
``tests/test_ohif.py``); each module states the part of it that it implements.
"""
