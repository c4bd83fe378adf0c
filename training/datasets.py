"""Datasets built from the index, read lazily from the archive through a preprocessing cache.

A dataset holds only small records (UIDs, archive paths, content hashes, labels); pixels are read
when an item is asked for, preprocessed with the inference code (``inference.preprocess``, so a
model sees in training exactly what it sees in production) and kept in an on-disk cache keyed by
the file's sha256 and the input spec. Memory therefore stays flat as the archive grows.

Splits are by patient: a held-out test set chosen by a salted hash of the patient (stable as the
archive grows: a patient once held out stays held out), and stratified K-fold over the remaining
patients (sklearn ``StratifiedGroupKFold``), so no patient is in two folds. Every run saves a
manifest (instances, labels, split, hash). Patients appear there only as salted pseudonyms.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom import dcmread
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch.utils.data import Dataset

from common.files import atomic_file
from config.tasks import Population
from config.views import ViewHeader, ViewTaxonomy
from inference.preprocess import letterbox, modality_values, normalise, prepare_radiograph
from inference.registry import InputSpec
from storage.models import Instance, Patient, Series, Study, StudyLabel
from training.labels import ReferenceSegmentation
from training.population import Seen, age_days, outside

RADIOGRAPH_MODALITIES = ("CR", "DX")


# --- records ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One training item: a radiograph, or one MR slice (with its volume's key)."""

    uid: str
    path: str
    sha256: str
    group: str
    study_uid: str
    series_uid: str
    label: float
    irds_grade: float | None = None


@dataclass(frozen=True)
class Volume:
    """An MR series and the reference SEG that labels it (for the segmentation cache)."""

    series_uid: str
    slices: tuple[tuple[str, str, str], ...]  # (SOP Instance UID, path, sha256), in InstanceNumber order
    seg_path: str
    seg_sha256: str
    segment_numbers: tuple[int, ...]


@dataclass
class Collection:
    """What a task trains on, as collected from the index."""

    task: str
    samples: list[Sample]
    classes: list[str] | None = None
    volumes: dict[str, Volume] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    seen: Seen = field(default_factory=Seen)
    """The modalities, body parts, views and ages of the samples: the population the version is registered with."""


def pseudonym(patient_key: str, salt: str) -> str:
    """A patient's stable pseudonym within one split salt (never the identifier itself)."""
    return hashlib.sha256(f"{salt}|{patient_key}".encode()).hexdigest()[:16]


def _radiograph_rows(session: Session, labelled_for: str | None = None) -> Iterable:
    """Every archived radiograph, or with ``labelled_for`` only those of studies labelled for that task:
    the query starts from the labels (index on ``study_label.task``), so a small labelled subset of a
    large archive is read without reading the rest."""
    query = select(Instance.sop_uid, Instance.file_path, Instance.sha256, Instance.view_position,
                   Instance.number_of_frames, Instance.acquisition_datetime, Series.series_uid, Series.modality,
                   Series.body_part, Series.series_description, Series.protocol_name, Study.id.label("study_pk"),
                   Study.study_uid, Study.study_description, Study.study_date, Study.patient_age,
                   Patient.patient_key, Patient.birth_date)
    if labelled_for is not None:
        query = (query.select_from(StudyLabel).join(Study, StudyLabel.study_pk == Study.id)
                 .join(Series, Series.study_pk == Study.id).join(Instance, Instance.series_pk == Series.id)
                 .where(StudyLabel.task == labelled_for))
    else:
        query = query.join(Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
    return session.execute(
        query.join(Patient, Study.patient_pk == Patient.id)
        .where(Series.modality.in_(RADIOGRAPH_MODALITIES), Series.is_result.is_(False))
        .order_by(Instance.id)).yield_per(500)


def _header(row) -> ViewHeader:  # noqa: ANN001 - a result row
    return ViewHeader(row.modality, row.body_part, row.view_position, row.series_description,
                      row.protocol_name, row.study_description)


def _labels(session: Session, task: str) -> dict[int, float]:
    return dict(session.execute(select(StudyLabel.study_pk, StudyLabel.value)
                                .where(StudyLabel.task == task)).all())


def _age(row) -> int | None:  # noqa: ANN001 - a result row
    return age_days(row.birth_date, row.study_date, row.acquisition_datetime, row.patient_age)


def _admit(collection: Collection, population: Population, row, view: str | None) -> bool:  # noqa: ANN001
    """Whether the film of ``row`` is inside ``population`` (counted under its reason when not)."""
    if (row.number_of_frames or 1) > 1:
        collection.skipped["multi-frame"] += 1
        return False
    age = _age(row)
    reason = outside(population, modality=row.modality, body_part=row.body_part, view=view, age=age)
    if reason:
        collection.skipped[reason] += 1
        return False
    return True


def _accept(collection: Collection, row, view: str | None, sample: Sample) -> None:  # noqa: ANN001
    collection.samples.append(sample)
    collection.seen.add(modality=row.modality, body_part=row.body_part, view=view, age=_age(row))


def collect_labelled(session: Session, task: str, taxonomy: ViewTaxonomy, population: Population, salt: str, *,
                     classes: list[str] | None = None,
                     relabel: Callable[[float], float | None] | None = None, unusable: str = "") -> Collection:
    """Radiographs of studies labelled for ``task`` inside ``population`` (its views derived from the
    headers); the label is the imported value (a class's index for a multiclass task), or what
    ``relabel`` makes of it (None: left out, counted under ``unusable``)."""
    labels, irds = _labels(session, task), _labels(session, "irds_grade")
    collection = Collection(task, [], classes=classes)
    for row in _radiograph_rows(session, labelled_for=task):
        view = taxonomy.label_of(_header(row))
        if not _admit(collection, population, row, view):
            continue
        label = float(labels[row.study_pk]) if relabel is None else relabel(float(labels[row.study_pk]))
        if label is None:
            collection.skipped[unusable] += 1
            continue
        _accept(collection, row, view, Sample(row.sop_uid, row.file_path, row.sha256,
                                              pseudonym(row.patient_key, salt), row.study_uid, row.series_uid,
                                              label, irds.get(row.study_pk)))
    return collection


def collect_views(session: Session, task: str, taxonomy: ViewTaxonomy, population: Population, salt: str,
                  max_per_class: int | None = None) -> Collection:
    """Radiographs inside ``population`` labelled by their own headers through the taxonomy's rules."""
    index = {name: i for i, name in enumerate(taxonomy.classes)}
    collection = Collection(task, [], classes=list(taxonomy.classes))
    counts: Counter = Counter()
    for row in _radiograph_rows(session):
        view = taxonomy.label_of(_header(row))
        if view is None:
            collection.skipped["no view rule matches"] += 1
            continue
        if not _admit(collection, population, row, view):
            continue
        if max_per_class and counts[view] >= max_per_class:
            collection.skipped["class cap"] += 1
            continue
        counts[view] += 1
        _accept(collection, row, view, Sample(row.sop_uid, row.file_path, row.sha256,
                                              pseudonym(row.patient_key, salt), row.study_uid, row.series_uid,
                                              float(index[view])))
    return collection


def collect_segmentation(session: Session, task: str, references: Sequence[ReferenceSegmentation],
                         population: Population, salt: str) -> Collection:
    """Every slice of every MR series inside ``population`` that a person-made SEG labels (a series left
    out counts once)."""
    collection = Collection(task, [])
    for reference in references:
        rows = session.execute(
            select(Instance.sop_uid, Instance.file_path, Instance.sha256, Instance.instance_number,
                   Instance.acquisition_datetime, Series.modality, Series.body_part, Study.study_uid,
                   Study.study_date, Study.patient_age, Patient.patient_key, Patient.birth_date)
            .join(Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
            .where(Series.series_uid == reference.mr_series_uid)).all()
        if not rows:
            continue
        first = rows[0]
        reason = outside(population, modality=first.modality, body_part=first.body_part, view=None,
                         age=_age(first))
        if reason:
            collection.skipped[reason] += 1
            continue
        collection.seen.add(modality=first.modality, body_part=first.body_part, view=None, age=_age(first))
        rows = sorted(rows, key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_uid))
        seg_sha = session.scalar(select(Instance.sha256).where(Instance.sop_uid == reference.seg_sop_uid))
        collection.volumes[reference.mr_series_uid] = Volume(
            reference.mr_series_uid, tuple((r.sop_uid, r.file_path, r.sha256) for r in rows),
            reference.seg_path, seg_sha or "", reference.segment_numbers)
        for r in rows:
            collection.samples.append(Sample(r.sop_uid, r.file_path, r.sha256, pseudonym(r.patient_key, salt),
                                             r.study_uid, reference.mr_series_uid, -1.0))
    return collection


# --- splits -----------------------------------------------------------------------------------

def _unit_hash(group: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}|test|{group}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def patient_strata(samples: Sequence[Sample], kind: str) -> dict[str, int]:
    """A patient's stratum: any positive (binary), most frequent class (views), 0 (segmentation)."""
    per_group: dict[str, list[int]] = {}
    for s in samples:
        per_group.setdefault(s.group, []).append(int(s.label))
    if kind == "binary":
        return {g: int(max(v)) for g, v in per_group.items()}
    if kind == "multiclass":
        return {g: Counter(v).most_common(1)[0][0] for g, v in per_group.items()}
    return {g: 0 for g in per_group}


def held_out_patients(strata: dict[str, int], fraction: float, salt: str, *, minimum_per_stratum: int = 1
                      ) -> set[str]:
    """Patients whose salted hash falls below ``fraction``; in a small archive, the lowest-hash
    patients of a stratum that would otherwise be missing are added (at most 1 in 3 of it)."""
    test = {g for g in strata if _unit_hash(g, salt) < fraction}
    for stratum in sorted(set(strata.values())):
        members = sorted((g for g, s in strata.items() if s == stratum), key=lambda g: _unit_hash(g, salt))
        present = sum(1 for g in members if g in test)
        room = max(len(members) // 3, 0)
        for g in members:
            if present >= min(minimum_per_stratum, room):
                break
            if g not in test:
                test.add(g)
                present += 1
    return test


def kfold_indices(samples: Sequence[Sample], folds: int, seed: int, stratified: bool
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) sample indices per fold; groups (patients) never straddle folds."""
    groups = np.array([s.group for s in samples])
    labels = np.array([int(s.label) for s in samples])
    n_groups = len(set(groups))
    if n_groups < folds:
        raise ValueError(f"{n_groups} patients outside the test set cannot make {folds} folds")
    if stratified:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [(tr, va) for tr, va in splitter.split(np.zeros(len(samples)), labels, groups)]
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(samples)), labels, groups)]


@dataclass
class Split:
    dev: list[Sample]
    test: list[Sample]
    folds: list[tuple[np.ndarray, np.ndarray]]

    def assignment(self) -> dict[str, str]:
        """Sample uid → ``test`` or ``fold-k`` (the fold it validates)."""
        where = {s.uid: "test" for s in self.test}
        for k, (_, validation) in enumerate(self.folds):
            where.update({self.dev[i].uid: f"fold-{k}" for i in validation})
        return where


def split(samples: Sequence[Sample], kind: str, *, folds: int, test_fraction: float, salt: str,
          seed: int) -> Split:
    strata = patient_strata(samples, kind)
    test_groups = held_out_patients(strata, test_fraction, salt)
    dev = [s for s in samples if s.group not in test_groups]
    test = [s for s in samples if s.group in test_groups]
    if not test:
        raise ValueError("the held-out test set is empty: the archive has too few patients")
    if kind == "binary" and len({int(s.label) for s in test}) < 2:
        raise ValueError("the held-out test set holds one class only: import more labels")
    return Split(dev, test, kfold_indices(dev, folds, seed, stratified=kind in ("binary", "multiclass")))


# --- manifest ---------------------------------------------------------------------------------

def manifest(collection: Collection, where: dict[str, str], spec: InputSpec) -> dict:
    """Instances, labels and split of a run, with a hash over all of it."""
    entries = [{"uid": s.uid, "sha256": s.sha256, "patient": s.group, "study_uid": s.study_uid,
                "series_uid": s.series_uid, "label": s.label, "split": where.get(s.uid, "unused")}
               for s in sorted(collection.samples, key=lambda s: s.uid)]
    references = [{"series_uid": v.series_uid, "seg_sha256": v.seg_sha256, "segments": list(v.segment_numbers)}
                  for v in sorted(collection.volumes.values(), key=lambda v: v.series_uid)]
    body = {"task": collection.task, "classes": collection.classes, "input_spec": asdict(spec),
            "entries": entries, "references": references}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    counts = Counter(e["split"] for e in entries)
    return {**body, "hash": digest, "counts": dict(sorted(counts.items())),
            "patients": len({e["patient"] for e in entries}), "skipped": dict(collection.skipped),
            "population": collection.seen.as_population()}


# --- the preprocessing cache ------------------------------------------------------------------

def _spec_key(spec: InputSpec) -> str:
    fields = {k: v for k, v in asdict(spec).items() if k != "patch"}  # preprocessing does not depend on it
    return json.dumps(fields, sort_keys=True)


class PreprocessCache:
    """Preprocessed arrays on disk under ``root``, keyed by content hash + input spec."""

    def __init__(self, root: Path, spec: InputSpec) -> None:
        self.root = Path(root)
        self.spec = spec
        self._spec = _spec_key(spec)

    def path(self, *parts: str) -> Path:
        key = hashlib.sha256("|".join((self._spec, *parts)).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def get(self, path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # damaged: build again
        array = build()
        self.put(path, array)
        return array

    @staticmethod
    def put(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as handle:
            np.save(handle, array, allow_pickle=False)


def radiograph_array(archive_root: Path, path: str, spec: InputSpec) -> np.ndarray:
    ds = dcmread(archive_root / path)
    image, _ = prepare_radiograph(ds, spec.image_size, normalisation=spec.normalisation,
                                  keep_aspect=spec.keep_aspect, clahe=spec.clahe)
    return image.astype(np.float16)


def volume_arrays(archive_root: Path, volume: Volume, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """An MR series normalised once per volume, each slice letterboxed, and its reference mask."""
    import highdicom as hd

    stack = np.stack([modality_values(dcmread(archive_root / path)) for _, path, _ in volume.slices])
    stack = normalise(stack, spec.normalisation)
    seg = hd.seg.segread(archive_root / volume.seg_path)
    labels = seg.get_pixels_by_source_instance([uid for uid, _, _ in volume.slices],
                                               segment_numbers=list(volume.segment_numbers),
                                               combine_segments=True, assert_missing_frames_are_empty=True)
    images = np.stack([letterbox(s, spec.image_size, keep_aspect=spec.keep_aspect)[0] for s in stack])
    masks = np.stack([letterbox((m > 0).astype(np.float32), spec.image_size, keep_aspect=spec.keep_aspect)[0]
                      for m in labels])
    return images.astype(np.float16), (masks > 0.5).astype(np.uint8)


# --- torch datasets ---------------------------------------------------------------------------

class RadiographDataset(Dataset):
    """(image (1, S, S) float32, target) for radiograph tasks; target float (binary) or long (classes)."""

    def __init__(self, samples: Sequence[Sample], archive_root: Path, cache: PreprocessCache, *,
                 multiclass: bool = False, augment: Callable | None = None) -> None:
        self.samples = list(samples)
        self.archive_root = Path(archive_root)
        self.cache = cache
        self.multiclass = multiclass
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        return self.cache.get(self.cache.path("radiograph", sample.sha256),
                              lambda: radiograph_array(self.archive_root, sample.path, self.cache.spec))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.image(index).astype(np.float32))[None]
        if self.augment is not None:
            image = self.augment(image)
        label = self.samples[index].label
        target = torch.tensor(int(label), dtype=torch.long) if self.multiclass else torch.tensor(label,
                                                                                                dtype=torch.float32)
        return image, target


class SliceDataset(Dataset):
    """(image (1, S, S) float32, mask (1, S, S) float32) for MR slices with a reference mask."""

    def __init__(self, samples: Sequence[Sample], volumes: dict[str, Volume], archive_root: Path,
                 cache: PreprocessCache, *, augment: Callable | None = None) -> None:
        self.samples = list(samples)
        self.volumes = volumes
        self.archive_root = Path(archive_root)
        self.cache = cache
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def _paths(self, volume: Volume, sha: str) -> tuple[Path, Path]:
        return (self.cache.path("mr-slice", sha, volume.seg_sha256),
                self.cache.path("mr-mask", sha, volume.seg_sha256, *map(str, volume.segment_numbers)))

    def _build(self, volume: Volume) -> None:
        images, masks = volume_arrays(self.archive_root, volume, self.cache.spec)
        for (_, _, sha), image, mask in zip(volume.slices, images, masks):
            image_path, mask_path = self._paths(volume, sha)
            self.cache.put(image_path, image)
            self.cache.put(mask_path, mask)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        volume = self.volumes[sample.series_uid]
        image_path, mask_path = self._paths(volume, sample.sha256)
        if not (image_path.is_file() and mask_path.is_file()):
            self._build(volume)
        return np.load(image_path), np.load(mask_path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.arrays(index)
        image_t = torch.from_numpy(image.astype(np.float32))[None]
        mask_t = torch.from_numpy(mask.astype(np.uint8))[None]
        if self.augment is not None:
            image_t, mask_t = self.augment(image_t, mask_t)
        return image_t, mask_t.float()


class VolumeDataset(Dataset):
    """(image (1, S, R, C), mask (1, S, R, C)) float32 per MR series, its slices letterboxed as for the 2D
    network. With ``patch``, item ``i`` is one patch of series ``i // patches`` drawn by MONAI
    (``RandCropByPosNegLabeld``: centred on lung or on background, equally often; a series smaller than
    the patch is padded first), the draw seeded from torch's generator so runs repeat and resume."""

    def __init__(self, volumes: Sequence[Volume], archive_root: Path, cache: PreprocessCache, *,
                 patch: tuple[int, int, int] | None = None, patches: int = 1) -> None:
        self.volumes = list(volumes)
        self.archive_root = Path(archive_root)
        self.cache = cache
        self.patches = patches if patch else 1
        self.sampler = _patch_sampler(patch) if patch else None

    def __len__(self) -> int:
        return len(self.volumes) * self.patches

    def arrays(self, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        shas = [sha for _, _, sha in volume.slices]
        image_path = self.cache.path("mr-volume", *shas, volume.seg_sha256)
        mask_path = self.cache.path("mr-volume-mask", *shas, volume.seg_sha256, *map(str, volume.segment_numbers))
        if not (image_path.is_file() and mask_path.is_file()):
            images, masks = volume_arrays(self.archive_root, volume, self.cache.spec)
            self.cache.put(image_path, images)
            self.cache.put(mask_path, masks)
        return np.load(image_path), np.load(mask_path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.arrays(self.volumes[index // self.patches])
        item = {"image": torch.from_numpy(image.astype(np.float32))[None],
                "mask": torch.from_numpy(mask.astype(np.float32))[None]}
        if self.sampler is not None:
            self.sampler.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            item = self.sampler(item)[0]
        return torch.as_tensor(item["image"]).contiguous(), torch.as_tensor(item["mask"]).contiguous()


def _patch_sampler(patch: tuple[int, int, int]) -> Callable:
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "mask"]
    return Compose([SpatialPadd(keys, spatial_size=patch),
                    RandCropByPosNegLabeld(keys, label_key="mask", spatial_size=patch, pos=1, neg=1,
                                           num_samples=1)])


def volumes_of(samples: Sequence[Sample], volumes: dict[str, Volume]) -> list[Volume]:
    """The series of ``samples`` (MR slices), each once, in order of first appearance."""
    return [volumes[uid] for uid in dict.fromkeys(s.series_uid for s in samples)]


def reference_lungs(archive_root: Path, volume: Volume, source_uids: Sequence[str]) -> tuple[np.ndarray, bool]:
    """The reviewer's SEG on the source grid of the slices ``source_uids`` (in that order): a label volume
    0 background, 1 left lung, 2 right lung, and True; or, when its segments do not say which lung is
    which (one combined lung segment), 1 for every lung voxel and False."""
    import highdicom as hd

    seg = hd.seg.segread(archive_root / volume.seg_path)
    sides = _lung_sides(seg, volume.segment_numbers)
    numbers = [sides["left"], sides["right"]] if len(sides) == 2 else list(volume.segment_numbers)
    labels = seg.get_pixels_by_source_instance(list(source_uids), segment_numbers=numbers,
                                               combine_segments=True, relabel=True,
                                               assert_missing_frames_are_empty=True)
    if len(sides) != 2:
        return (labels > 0).astype(np.uint8), False
    return labels.astype(np.uint8), True


LEFT_LUNG_CODE, RIGHT_LUNG_CODE = "44029006", "3341006"  # SNOMED CT


def _lung_sides(seg, numbers: Sequence[int]) -> dict[str, int]:  # noqa: ANN001 - highdicom Segmentation
    """Which of ``numbers`` is the left and which the right lung, by code or label."""
    sides = {}
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) not in numbers:
            continue
        codes = {str(c.CodeValue) for c in item.get("SegmentedPropertyTypeCodeSequence", [])}
        label = str(item.get("SegmentLabel", "")).lower()
        if LEFT_LUNG_CODE in codes or label.startswith("left"):
            sides["left"] = int(item.SegmentNumber)
        elif RIGHT_LUNG_CODE in codes or label.startswith("right"):
            sides["right"] = int(item.SegmentNumber)
    return sides


def class_weights(samples: Sequence[Sample]) -> list[float]:
    """Per-sample weights that draw every class equally often (class-balanced sampling)."""
    counts = Counter(int(s.label) for s in samples)
    return [1.0 / counts[int(s.label)] for s in samples]
