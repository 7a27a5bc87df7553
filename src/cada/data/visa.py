"""The VisA layout with its official one-class split file.

ROOT/split_csv/1cls.csv (columns object, split, label, image, mask; paths relative to ROOT, never leaving it),
ROOT/<object>/Data/Images/{Normal,Anomaly}/*.JPG, ROOT/<object>/Data/Masks/Anomaly/*.png.
Mask pixels hold region numbers, not 0/255: any non-zero pixel is anomalous (load_mask reads them so).

VisA's train/test split exists only in that file, so there is no fallback without it: a split made up
here would give numbers that cannot be compared with anyone else's. A VisA tree already converted to the
MVTec AD layout reads with the MVTec reader.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

from cada.data.layouts import Layout
from cada.data.mvtec import NORMAL, Sample
from cada.registry import LAYOUTS

SPLIT_FILE = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
ANOMALY = "anomaly"  # the defect name of VisA's anomalous images: the split file has no defect types


def _read_rows(split_file: Path) -> list[dict]:
    # utf-8-sig: a split file saved by a spreadsheet program starts with a byte-order mark.
    with open(split_file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"VisA split file {split_file} lacks the columns {sorted(missing)} (expected {', '.join(COLUMNS)})"
            )
        return [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]


def visa_samples(
    root: str | Path, split: str, classes: list[str] | None = None, split_file: str | Path | None = None
) -> list[Sample]:
    """All samples of `split` ('train' or 'test') listed in the split file, sorted by object and path."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    split_file = Path(split_file) if split_file else root / SPLIT_FILE
    if not split_file.is_file():
        raise FileNotFoundError(
            f"{root} looks like VisA but has no split file {split_file}. VisA's train/test split is defined only by "
            f"that file (it comes with the VisA download as {SPLIT_FILE}); put it there, or convert the data to the "
            "MVTec AD layout, or pass folders of normal and anomalous images with --format folder"
        )
    rows = _read_rows(split_file)
    listed = sorted({row["object"] for row in rows})
    wanted = listed if classes is None else list(classes)
    unknown = set(wanted) - set(listed)
    if unknown:
        raise FileNotFoundError(f"objects {sorted(unknown)} are not in the VisA split file {split_file}")
    absent = [name for name in wanted if not (root / name).is_dir()]
    if absent:  # a partial download: use the objects that are there
        warnings.warn(f"VisA objects {absent} are listed in {split_file} but have no folder under {root}; left out")
        wanted = [name for name in wanted if name not in absent]
    if not wanted:
        raise FileNotFoundError(f"none of the objects in {split_file} has a folder under {root}")

    found: dict[str, list[Sample]] = {name: [] for name in wanted}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["split"] != split or row["object"] not in found:
            continue
        label = LABELS.get(row["label"].lower())
        if label is None:
            raise ValueError(f"{split_file} line {line}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
        for column in ("image", "mask"):
            listed_path = Path(row[column])
            if listed_path.is_absolute() or ".." in listed_path.parts:
                raise ValueError(
                    f"{split_file} line {line}: {column} path {row[column]!r} leaves the data folder "
                    f"{root}; the split file must name paths inside it"
                )
        mask = root / row["mask"] if row["mask"] and label else None
        # A listed mask that is not on disk counts as missing: image metrics still use the image.
        mask = mask if mask is not None and mask.is_file() else None
        defect = ANOMALY if label else NORMAL
        found[row["object"]].append(Sample(root / row["image"], label, row["object"], defect, mask))
    samples: list[Sample] = []
    for name, object_samples in found.items():
        if not object_samples:
            if split == "train":
                raise ValueError(f"class {name!r} has no training images in {split_file}")
            warnings.warn(f"class {name!r} has no test images in {split_file}; it is left out of evaluation")
        samples.extend(sorted(object_samples, key=lambda s: str(s.path)))
    return samples


@LAYOUTS.register("visa")
class VisALayout(Layout):
    looked_for = f"VisA ({SPLIT_FILE} or <object>/Data/Images)"
    specificity = 20  # its object folders may hold MVTec-like parts too

    def recognises_root(self, root: Path) -> bool:
        return (root / SPLIT_FILE).is_file()

    def recognises_class(self, folder: Path) -> bool:
        return (folder / "Data" / "Images").is_dir()

    def samples(self, root: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
        return visa_samples(root, split, classes)
