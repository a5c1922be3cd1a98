"""Segmentation datasets read from the folder layouts users already have on disk.

- GTA5: ``root/images/<name>.png`` with ``root/labels/<name>.png`` (raw Cityscapes ids).
- SYNTHIA-RAND-CITYSCAPES: ``root/RGB/<name>.png`` with ``root/GT/LABELS/<name>.png``
  (16-bit multi-channel PNG, class id in the first channel; read with OpenCV where installed,
  else pypng, because Pillow truncates 16-bit channels to their high byte).
- Cityscapes: ``root/leftImg8bit/<split>/<city>/<base>_leftImg8bit.png`` with
  ``root/gtFine/<split>/<city>/<base>_gtFine_labelIds.png`` (raw ids).

Every dataset yields ``(image, label, name)``: ``image`` float32 ``3 x H x W`` normalised with
the ImageNet mean/std, ``label`` int64 ``H x W`` in train ids (255 = ignore), or an empty int64
tensor when labels are not loaded, and ``name`` the sample's name (``<city>/<base>`` for
Cityscapes). Construction checks the layout (folders, image/label pairing, non-empty);
``preflight()`` also opens every file, so that a broken download fails before training.
"""

from __future__ import annotations

import abc
import collections
import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from cossim_fast.data.labels import (
    CITYSCAPES_ID_TO_TRAINID,
    CLASS_NAMES,
    GTA5_ID_TO_TRAINID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAINID,
    map_ids,
)

#: ImageNet RGB statistics on the [0, 1] scale (torchvision / mmseg convention).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Label modes that hold one id per pixel; an RGB label is usually a colour visualisation
# (e.g. Cityscapes *_gtFine_color.png) picked by mistake.
_ID_MAP_MODES = ("L", "P", "I", "I;16", "I;16B")
_MAX_LISTED_PROBLEMS = 5
#: Labels the pre-flight scan decodes to check their ids (first, middle and last).
_LABELS_SAMPLED = 3
#: Train ids as a label file of the wrong kind holds them (e.g. Cityscapes' labelTrainIds).
_TRAIN_ID_VALUES = frozenset((*range(19), 255))


class DatasetError(ValueError):
    """A dataset on disk does not have the expected layout or content."""


@dataclass(frozen=True)
class ScanReport:
    """What a pre-flight scan saw: sample count, image sizes ``(w, h) -> count``, and warnings
    about content that may be wrong (e.g. labels that look like train ids, not raw ids)."""

    dataset: str
    root: Path
    num_samples: int
    image_sizes: dict[tuple[int, int], int]
    labels_checked: bool
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(self.image_sizes.items()))
        labels = "with labels" if self.labels_checked else "images only"
        return f"{self.dataset} at {self.root}: {self.num_samples} samples ({labels}), image sizes {sizes}"


def _problems_error(header: str, problems: Sequence[str]) -> DatasetError:
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return DatasetError(f"{header} ({len(problems)} problem(s)):\n{listed}{tail}")


def _check_size(value: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    w, h = (int(v) for v in value)
    if w <= 0 or h <= 0:
        raise ValueError(f"{what} must be a positive (width, height), got {value}")
    return (w, h)


def _fits(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
    return inner[0] <= outer[0] and inner[1] <= outer[1]


@functools.cache
def _opencv():
    """OpenCV's module if it is installed, else None (an optional, faster PNG decoder)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _is_palette_png(path: str | Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.mode == "P"
    except (OSError, UnidentifiedImageError):
        return False  # the decoder below reports what is wrong with the file


def read_synthia_label(path: str | Path) -> np.ndarray:
    """Raw SYNTHIA class ids (first channel) of a label PNG of any bit depth, as ``H x W``.

    Decoded by OpenCV where it is installed (``pip install opencv-python-headless``, as DAFormer
    does), else by pypng, which is pure Python: a 1280 x 760 label written with libpng's
    filters took 0.43 s with pypng and 0.013 s with OpenCV on one core here, and at 0.43 s
    data loading bounds SYNTHIA training. Pillow cannot be used: it truncates 16-bit channels
    to their high byte.
    """
    cv2 = _opencv()
    if _is_palette_png(path):  # OpenCV would expand the palette to colours: the indices are the ids
        try:
            with Image.open(path) as im:
                return np.array(im)
        except OSError as exc:
            raise DatasetError(f"cannot read {path} as a PNG label: {exc}") from exc
    if cv2 is not None:
        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if data is None:
            raise DatasetError(f"cannot read {path} as a PNG label (OpenCV could not decode it)")
        return data if data.ndim == 2 else data[:, :, 2]  # OpenCV orders channels B, G, R(, A)
    try:
        import png
    except ImportError as exc:  # only SYNTHIA users need it
        raise ImportError(
            "reading SYNTHIA labels (16-bit multi-channel PNG, which Pillow cannot decode) "
            "needs OpenCV (pip install opencv-python-headless) or pypng (pip install pypng; pure Python, 30x slower)"
        ) from exc
    try:
        width, height, rows, info = png.Reader(filename=str(path)).read()
        data = np.vstack([np.asarray(row) for row in rows])
    except (png.Error, OSError, ValueError, zlib.error) as exc:  # zlib: a corrupt stream with intact CRCs
        raise DatasetError(f"cannot read {path} as a PNG label: {exc}") from exc
    return data.reshape(height, width, info["planes"])[:, :, 0]


class SegmentationDataset(Dataset[tuple[Tensor, Tensor, str]], abc.ABC):
    """Base class: pairs of (image, raw-id label) files mapped to train ids on the fly.

    Args:
        root: dataset root folder.
        load_labels: read labels (False for the unlabelled target split in training; the
            label is then an empty int64 tensor and label files need not exist).
        resize: ``(width, height)`` for the image (bilinear) and, if ``resize_label``, the
            label (nearest); None keeps the stored size.
        resize_label: False keeps the label at full resolution (evaluation scores
            predictions upsampled to the original label size).
        crop_size: ``(width, height)`` of a random crop taken after resizing.
        flip: random horizontal flip with probability 0.5.
        seed: seed of the augmentation generator. In DataLoader workers it is mixed with the
            worker's seed (drawn from the loader's generator), so runs are reproducible and
            workers do not repeat each other's draws.
        names: optional subset (and order) of sample names, e.g. from a list file.
    """

    #: Short dataset name used in messages.
    display_name: ClassVar[str] = ""
    #: Raw id -> train id table.
    label_table: ClassVar[np.ndarray]

    def __init__(
        self,
        root: str | Path,
        *,
        load_labels: bool = True,
        resize: tuple[int, int] | None = None,
        resize_label: bool = True,
        crop_size: tuple[int, int] | None = None,
        flip: bool = False,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.load_labels = load_labels
        self.resize = _check_size(resize, "resize")
        self.resize_label = resize_label
        self.crop_size = _check_size(crop_size, "crop_size")
        self.flip = flip
        self.seed = int(seed)
        if self.crop_size is not None and not resize_label:
            raise ValueError("crop_size needs resize_label=True (image and label must share a grid)")
        if self.crop_size is not None and self.resize is not None and not _fits(self.crop_size, self.resize):
            raise ValueError(f"crop_size {self.crop_size} is larger than resize {self.resize}")
        self._rng: torch.Generator | None = None
        self._rng_key: int | None = None

        samples = self._index()
        if names is not None:
            by_name = {s[0]: s for s in samples}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise _problems_error(
                    f"{self.display_name}: names not found under {self.root} ({self.layout()})",
                    [f"no image for name {n!r}" for n in unknown],
                )
            samples = [by_name[n] for n in names]
        if not samples:
            raise DatasetError(
                f"{self.display_name}: no images found under {self.root} (expected {self.layout()})"
            )
        if load_labels:
            missing = [f"{img} has no label: expected {lab}" for _, img, lab in samples if not lab.is_file()]
            if missing:
                header = f"{self.display_name}: images without labels under {self.root}"
                raise _problems_error(f"{header} (expected {self.layout()})", missing)
        self.names: list[str] = [s[0] for s in samples]
        self.image_paths: list[Path] = [s[1] for s in samples]
        self.label_paths: list[Path] = [s[2] for s in samples]

    # --- layout, implemented by each dataset --------------------------------------------------

    @abc.abstractmethod
    def layout(self) -> str:
        """Human description of the expected layout, used in error messages."""

    @abc.abstractmethod
    def _index(self) -> list[tuple[str, Path, Path]]:
        """All ``(name, image path, expected label path)``, sorted; checks the folders exist."""

    def _read_raw_label(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                problem = self._check_label_header(path, im)  # e.g. a colour rendering of the labels
                if problem is None:
                    return np.array(im)  # 'P' mode gives palette indices, which are the ids
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read label {path}: {exc}") from exc
        raise DatasetError(problem)

    def _check_label_header(self, path: Path, im: Image.Image) -> str | None:
        if im.mode not in _ID_MAP_MODES:
            return f"{path} has mode {im.mode}; expected a single-channel id map ({self.layout()})"
        return None

    def _require_dir(self, path: Path) -> None:
        if not path.is_dir():
            raise DatasetError(f"missing folder {path} (expected {self.layout()})")

    # --- pre-flight -------------------------------------------------------------------------

    def preflight(self, deep: bool = False) -> ScanReport:
        """Open every file before training: readable PNGs, label modes, image/label sizes.

        Reads only PNG headers unless ``deep``, which decodes every file (slow on full
        datasets, catches truncated files), and decodes a few labels to check their ids.
        Raises ``DatasetError`` listing the problems.
        """
        problems: list[str] = []
        sizes: collections.Counter[tuple[int, int]] = collections.Counter()
        for image_path, label_path in zip(self.image_paths, self.label_paths, strict=True):
            image_size = self._scan_file(image_path, deep, problems, is_label=False)
            if image_size is not None:
                sizes[image_size] += 1
                crop = self.crop_size
                if crop is not None and self.resize is None and not _fits(crop, image_size):
                    w, h = image_size
                    problems.append(f"{image_path} is {w}x{h}, smaller than crop_size {crop}")
            if not self.load_labels:
                continue
            label_size = self._scan_file(label_path, deep, problems, is_label=True)
            if image_size is not None and label_size is not None and image_size != label_size:
                problems.append(
                    f"image {image_path} is {image_size[0]}x{image_size[1]} but its label "
                    f"{label_path} is {label_size[0]}x{label_size[1]}"
                )
        if problems:
            raise _problems_error(f"{self.display_name} pre-flight scan of {self.root} failed", problems)
        warnings = self._check_label_ids() if self.load_labels else ()
        return ScanReport(self.display_name, self.root, len(self), dict(sizes), self.load_labels, warnings)

    def _check_label_ids(self) -> tuple[str, ...]:
        """Decode a few labels: none of whose pixels maps to a class is an error (wrong ids:
        the run would train on nothing); ids that look like train ids are a warning."""
        picks = sorted({0, len(self) // 2, len(self) - 1})[:_LABELS_SAMPLED]
        raw = [self._read_raw_label(self.label_paths[i]) for i in picks]
        seen = set(np.unique(np.concatenate([r.ravel() for r in raw])).tolist())
        names = ", ".join(str(self.label_paths[i]) for i in picks)
        shown = ", ".join(str(v) for v in sorted(seen)[:12]) + (", ..." if len(seen) > 12 else "")
        train_ids = IGNORE_INDEX in seen and seen <= _TRAIN_ID_VALUES
        hint = "they look like train ids (0-18, 255 = ignore)"
        if all((map_ids(r, self.label_table) == IGNORE_INDEX).all() for r in raw):
            raise DatasetError(
                f"{self.display_name}: no pixel of the labels {names} maps to a class (ids seen: {shown}"
                f"{'; ' + hint if train_ids else ''}); expected {self._raw_ids()}"
            )
        if train_ids:
            return (f"{self.display_name}: the labels {names} hold only {shown}: {hint}, but they are read as "
                    f"{self._raw_ids()}",)
        return ()

    def _raw_ids(self) -> str:
        known = [i for i, train_id in enumerate(self.label_table.tolist()) if train_id != IGNORE_INDEX]
        first, last = known[0], known[-1]
        table = self.label_table
        return (f"raw {self.display_name} ids ({first} = {CLASS_NAMES[table[first]]} ... {last} = "
                f"{CLASS_NAMES[table[last]]}, the rest ignored)")

    def _scan_file(
        self, path: Path, deep: bool, problems: list[str], is_label: bool
    ) -> tuple[int, int] | None:
        """Size of a PNG from its header (problems appended, None if unusable)."""
        try:
            with Image.open(path) as im:
                if im.format != "PNG":
                    problems.append(f"{path} is {im.format}, expected PNG")
                    return None
                size = im.size
                issue = self._check_label_header(path, im) if is_label else None
                if deep and not is_label:
                    im.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            problems.append(f"cannot read {path} as PNG: {exc}")
            return None
        if issue is None and deep and is_label:
            try:
                self._read_raw_label(path)
            except DatasetError as exc:
                issue = str(exc)
        if issue is not None:
            problems.append(issue)
            return None
        return size

    # --- loading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str]:
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        try:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image {image_path}: {exc}") from exc
        label = None
        if self.load_labels:
            label = map_ids(self._read_raw_label(label_path), self.label_table)
            if label.shape != (image.height, image.width):
                raise DatasetError(
                    f"image {image_path} is {image.width}x{image.height} but its label {label_path} "
                    f"is {label.shape[1]}x{label.shape[0]}"
                )
        if self.resize is not None:
            image = image.resize(self.resize, Image.Resampling.BILINEAR)
            if label is not None and self.resize_label:
                label = np.asarray(Image.fromarray(label).resize(self.resize, Image.Resampling.NEAREST))
        pixels = np.asarray(image)

        if self.crop_size is not None:
            gen = self._generator()
            cw, ch = self.crop_size
            h, w = pixels.shape[:2]
            if cw > w or ch > h:
                raise DatasetError(
                    f"{image_path} is {w}x{h} after resizing, smaller than crop_size {self.crop_size}"
                )
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            pixels = pixels[y0 : y0 + ch, x0 : x0 + cw]
            if label is not None:
                label = label[y0 : y0 + ch, x0 : x0 + cw]
        if self.flip and float(torch.rand((), generator=self._generator())) < 0.5:
            pixels = pixels[:, ::-1]
            if label is not None:
                label = label[:, ::-1]

        # copy: arrays from PIL are read-only, and flips are negative-stride views
        image_t = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        image_t = image_t.sub_(mean).div_(std)
        label_t = (
            torch.from_numpy(label.astype(np.int64))  # astype copies, so flipped views are fine
            if label is not None
            else torch.empty(0, dtype=torch.int64)
        )
        return image_t, label_t, self.names[index]

    def _generator(self) -> torch.Generator:
        info = get_worker_info()
        key = None if info is None else info.seed
        if self._rng is None or self._rng_key != key:
            seed = self.seed if info is None else (self.seed * 1_000_003 + info.seed) % (2**63)
            self._rng = torch.Generator().manual_seed(seed)
            self._rng_key = key
        return self._rng

    def __getstate__(self) -> dict[str, object]:
        # Worker processes build their own generator; never ship the parent's.
        state = self.__dict__.copy()
        state["_rng"] = None
        state["_rng_key"] = None
        return state

    def __repr__(self) -> str:
        kind, root = type(self).__name__, str(self.root)
        return f"{kind}(root={root!r}, samples={len(self)}, load_labels={self.load_labels})"


class GTA5Dataset(SegmentationDataset):
    """GTA5: ``root/images/<name>.png`` with ``root/labels/<name>.png`` (Cityscapes ids)."""

    display_name = "GTA5"
    label_table = GTA5_ID_TO_TRAINID

    def layout(self) -> str:
        return "GTA5 layout root/images/<name>.png with root/labels/<name>.png"

    def _index(self) -> list[tuple[str, Path, Path]]:
        images, labels = self.root / "images", self.root / "labels"
        self._require_dir(images)
        if self.load_labels:
            self._require_dir(labels)
        return [(p.stem, p, labels / p.name) for p in sorted(images.glob("*.png"))]


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``root/RGB/<name>.png`` with ``root/GT/LABELS/<name>.png``."""

    display_name = "SYNTHIA"
    label_table = SYNTHIA_ID_TO_TRAINID

    def layout(self) -> str:
        return "SYNTHIA-RAND-CITYSCAPES layout root/RGB/<name>.png with root/GT/LABELS/<name>.png"

    def _index(self) -> list[tuple[str, Path, Path]]:
        images, labels = self.root / "RGB", self.root / "GT" / "LABELS"
        self._require_dir(images)
        if self.load_labels:
            self._require_dir(labels)
        return [(p.stem, p, labels / p.name) for p in sorted(images.glob("*.png"))]

    def _read_raw_label(self, path: Path) -> np.ndarray:
        return read_synthia_label(path)

    def _check_label_header(self, path: Path, im: Image.Image) -> str | None:
        return None  # any channel count / bit depth: the id is in the first channel


class CityscapesDataset(SegmentationDataset):
    """Cityscapes: ``root/leftImg8bit/<split>/<city>/<base>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<base>_gtFine_labelIds.png``; names are ``<city>/<base>``."""

    display_name = "Cityscapes"
    label_table = CITYSCAPES_ID_TO_TRAINID
    _IMAGE_SUFFIX = "_leftImg8bit.png"
    _LABEL_SUFFIX = "_gtFine_labelIds.png"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        load_labels: bool = True,
        resize: tuple[int, int] | None = None,
        resize_label: bool = True,
        crop_size: tuple[int, int] | None = None,
        flip: bool = False,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        self.split = split  # needed by _index() and layout(), which the base constructor calls
        super().__init__(
            root,
            load_labels=load_labels,
            resize=resize,
            resize_label=resize_label,
            crop_size=crop_size,
            flip=flip,
            seed=seed,
            names=names,
        )

    def layout(self) -> str:
        s = self.split
        images = f"root/leftImg8bit/{s}/<city>/*{self._IMAGE_SUFFIX}"
        return f"Cityscapes layout {images} with root/gtFine/{s}/<city>/*{self._LABEL_SUFFIX}"

    def _index(self) -> list[tuple[str, Path, Path]]:
        images = self.root / "leftImg8bit" / self.split
        labels = self.root / "gtFine" / self.split
        self._require_dir(images)
        if self.load_labels:
            self._require_dir(labels)
        samples = []
        for path in sorted(images.glob(f"*/*{self._IMAGE_SUFFIX}")):
            city, base = path.parent.name, path.name[: -len(self._IMAGE_SUFFIX)]
            samples.append((f"{city}/{base}", path, labels / city / f"{base}{self._LABEL_SUFFIX}"))
        return samples


#: Dataset classes by config name.
DATASETS: dict[str, type[SegmentationDataset]] = {
    "gta5": GTA5Dataset,
    "synthia": SynthiaDataset,
    "cityscapes": CityscapesDataset,
}
