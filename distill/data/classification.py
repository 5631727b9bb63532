"""Classification readers: ImageFolder/ImageNet, CUB-200-2011, and torchvision's fine-grained sets.

Each returns a `ClassificationDataset` with human-readable `classes` (used in zero-shot prompts) and
prompt `templates`. Names come from the dataset's own files where it ships them; the rest live as
package data under `distill/data/templates/`.
"""
from __future__ import annotations

import os
import random
from importlib import resources
from pathlib import Path

from .base import ClassificationDataset, DatasetLayoutError, require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _package_lines(filename: str) -> list[str]:
    text = resources.files("distill.data").joinpath("templates", filename).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def package_templates(dataset: str) -> list[str]:
    """Prompt templates shipped for `dataset` (distill/data/templates/<dataset>.txt)."""
    return _package_lines(f"{dataset}.txt")


def read_lines(path: str | os.PathLike) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def humanize(folder_name: str) -> str:
    """`Black_footed_Albatross` / `apple_pie` -> `black footed albatross` / `apple pie`."""
    return folder_name.replace("_", " ").strip().lower()


def openai_imagenet_templates() -> list[str]:
    """open_clip ships the 80 OpenAI ImageNet templates as lambdas; render them with "{}"."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


IMAGEFOLDER_LAYOUT = """  ROOT/<split>/<class folder>/<image>.jpg   (e.g. ROOT/train/..., ROOT/val/...)
  ROOT/classnames.txt   optional: one human-readable name per class, in sorted folder order
  ROOT/templates.txt    optional: prompt templates containing "{}\""""


def load_imagefolder(root: str | os.PathLike, split: str = "val", classnames: str | os.PathLike | None = None,
                     templates: str | os.PathLike | list[str] | None = None, name: str = "imagefolder",
                     source: str = "any ImageFolder tree (torchvision.datasets.ImageFolder layout)",
                     default_classnames: list[str] | None = None,
                     default_templates: list[str] | None = None) -> ClassificationDataset:
    """An ImageFolder split. Class index = position of the folder in sorted order (torchvision's rule).

    Names: `classnames` file, else ROOT/classnames.txt, else `default_classnames`, else folder names
    with underscores as spaces. Templates: `templates` (file or list), else ROOT/templates.txt, else
    `default_templates`, else None."""
    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(root)
    split_dir = root / split
    require(split_dir.is_dir(), name, root, f"split folder '{split}' not found", IMAGEFOLDER_LAYOUT, source)
    try:
        folders, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as e:
        raise DatasetLayoutError(name, root, str(e), IMAGEFOLDER_LAYOUT, source) from None
    require(len(samples) > 0, name, root, f"no images under {split_dir}", IMAGEFOLDER_LAYOUT, source)

    names_file = Path(classnames) if classnames is not None else root / "classnames.txt"
    if names_file.is_file():
        classes = read_lines(names_file)
        if len(classes) != len(folders):
            raise ValueError(f"{name}: {names_file} lists {len(classes)} names but {split_dir} has "
                             f"{len(folders)} class folders; it must hold one name per folder in sorted order")
    elif classnames is not None:
        raise FileNotFoundError(f"{name}: classnames file {classnames} not found")
    elif default_classnames is not None:
        if len(default_classnames) != len(folders):
            raise ValueError(f"{name}: expected {len(default_classnames)} class folders in {split_dir}, "
                             f"found {len(folders)}; pass classnames=FILE for a subset")
        classes = list(default_classnames)
    else:
        classes = [humanize(f) for f in folders]

    if isinstance(templates, list):
        tmpl = templates
    elif templates is not None:
        tmpl = read_lines(templates)
    elif (root / "templates.txt").is_file():
        tmpl = read_lines(root / "templates.txt")
    else:
        tmpl = default_templates
    return ClassificationDataset(name, [p for p, _ in samples], [t for _, t in samples], classes, tmpl)


def load_imagenet(root: str | os.PathLike, split: str = "val", **kw) -> ClassificationDataset:
    """ImageNet-1k as ImageFolder (`ROOT/{train,val}/n01440764/...`, val sorted into wnid folders).

    Names and the 80 OpenAI templates come from open_clip unless overridden."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    kw.setdefault("default_classnames", list(IMAGENET_CLASSNAMES))
    kw.setdefault("default_templates", openai_imagenet_templates())
    return load_imagefolder(root, split, name="imagenet",
                            source="https://image-net.org (ILSVRC2012; val images sorted into wnid folders)", **kw)


# ---------------------------------------------------------------- CUB-200-2011 (its own layout)
CUB_LAYOUT = """  ROOT/CUB_200_2011/images.txt              '<image id> <relative path>'
  ROOT/CUB_200_2011/image_class_labels.txt  '<image id> <class id 1..200>'
  ROOT/CUB_200_2011/train_test_split.txt    '<image id> <1 = train, 0 = test>'
  ROOT/CUB_200_2011/classes.txt             '<class id> <NNN.Folder_Name>'
  ROOT/CUB_200_2011/images/<NNN.Folder_Name>/*.jpg
  (ROOT may also be the CUB_200_2011 folder itself)"""
CUB_SOURCE = "Caltech-UCSD Birds-200-2011, https://www.vision.caltech.edu/datasets/cub_200_2011/"


def _id_table(path: Path) -> dict[int, str]:
    table = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, value = line.strip().split(" ", 1)
            table[int(key)] = value.strip()
    return table


def load_cub200(root: str | os.PathLike, split: str = "test", **_) -> ClassificationDataset:
    root = Path(root)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    files = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
    missing = [f for f in files if not (base / f).is_file()]
    require(not missing, "cub200", root, f"missing {', '.join(missing)}", CUB_LAYOUT, CUB_SOURCE)
    if split not in ("train", "test"):
        raise ValueError(f"cub200: split must be 'train' or 'test', got {split!r}")
    images = _id_table(base / "images.txt")
    labels = _id_table(base / "image_class_labels.txt")
    is_train = _id_table(base / "train_test_split.txt")
    class_table = _id_table(base / "classes.txt")
    class_ids = sorted(class_table)
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    # '001.Black_footed_Albatross' -> 'black footed albatross'
    classes = [humanize(class_table[c].split(".", 1)[-1]) for c in class_ids]
    want = "1" if split == "train" else "0"
    ids = sorted(i for i in images if is_train[i] == want)
    return ClassificationDataset("cub200", [base / "images" / images[i] for i in ids],
                                 [index_of[int(labels[i])] for i in ids], classes, package_templates("cub200"))


# ---------------------------------------------------------------- torchvision-backed readers
def _tv_dataset(name: str, root: Path, layout: str, source: str, exists: bool, build):
    require(exists, name, root, "dataset folder not found", layout, source)
    try:
        return build()
    except (RuntimeError, FileNotFoundError) as e:
        raise DatasetLayoutError(name, root, f"torchvision could not read it: {e}", layout, source) from None


def load_food101(root: str | os.PathLike, split: str = "test", **_) -> ClassificationDataset:
    from torchvision.datasets import Food101
    root = Path(root)
    layout = ("  ROOT/food-101/meta/{train,test}.json   {class: ['class/id', ...]}\n"
              "  ROOT/food-101/images/<class>/<id>.jpg")
    tv = _tv_dataset("food101", root, layout, "Food-101 (Bossard et al. 2014), "
                     "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
                     (root / "food-101" / "meta" / f"{split}.json").is_file(),
                     lambda: Food101(str(root), split=split, download=False))
    return ClassificationDataset("food101", tv._image_files, tv._labels, [humanize(c) for c in tv.classes],
                                 package_templates("food101"))


def load_dtd(root: str | os.PathLike, split: str = "test", partition: int = 1, **_) -> ClassificationDataset:
    from torchvision.datasets import DTD
    root = Path(root)
    layout = ("  ROOT/dtd/dtd/images/<texture>/<image>.jpg\n"
              "  ROOT/dtd/dtd/labels/{train,val,test}<1..10>.txt   lines '<texture>/<image>.jpg'")
    tv = _tv_dataset("dtd", root, layout, "Describable Textures Dataset, https://www.robots.ox.ac.uk/~vgg/data/dtd/",
                     (root / "dtd" / "dtd" / "labels" / f"{split}{partition}.txt").is_file(),
                     lambda: DTD(str(root), split=split, partition=partition, download=False))
    return ClassificationDataset("dtd", tv._image_files, tv._labels, [humanize(c) for c in tv.classes],
                                 package_templates("dtd"))


def load_fgvc_aircraft(root: str | os.PathLike, split: str = "test", annotation_level: str = "variant",
                       **_) -> ClassificationDataset:
    from torchvision.datasets import FGVCAircraft
    root = Path(root)
    layout = ("  ROOT/fgvc-aircraft-2013b/data/variants.txt              one class name per line\n"
              "  ROOT/fgvc-aircraft-2013b/data/images_variant_<split>.txt  '<image id> <class name>'\n"
              "  ROOT/fgvc-aircraft-2013b/data/images/<image id>.jpg")
    tv = _tv_dataset("fgvc_aircraft", root, layout,
                     "FGVC-Aircraft 2013b, https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
                     (root / "fgvc-aircraft-2013b" / "data" / f"images_{annotation_level}_{split}.txt").is_file(),
                     lambda: FGVCAircraft(str(root), split=split, annotation_level=annotation_level, download=False))
    return ClassificationDataset("fgvc_aircraft", tv._image_files, tv._labels, list(tv.classes),
                                 package_templates("fgvc_aircraft"))


FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}


def load_flowers102(root: str | os.PathLike, split: str = "test", **_) -> ClassificationDataset:
    """Oxford Flowers-102 in torchvision's layout. Read here with scipy rather than through
    torchvision's class because that one md5-checks the .mat files (which also rejects any re-saved
    copy); the parsing is the same: 1-based image ids, 1-based labels."""
    import numpy as np
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102
    root = Path(root)
    base = root / "flowers-102"
    layout = ("  ROOT/flowers-102/jpg/image_00001.jpg ...\n"
              "  ROOT/flowers-102/imagelabels.mat   'labels': 1..102 per image id\n"
              "  ROOT/flowers-102/setid.mat         'trnid', 'valid', 'tstid': 1-based image ids")
    source = "Oxford 102 Flowers, https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
    ok = (base / "jpg").is_dir() and (base / "imagelabels.mat").is_file() and (base / "setid.mat").is_file()
    require(ok, "flowers102", root, "dataset files not found", layout, source)
    if split not in FLOWERS_SPLITS:
        raise ValueError(f"flowers102: split must be one of {list(FLOWERS_SPLITS)}, got {split!r}")
    ids = loadmat(base / "setid.mat", squeeze_me=True)[FLOWERS_SPLITS[split]]
    labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]
    ids = [int(i) for i in np.atleast_1d(ids)]
    labels = np.atleast_1d(labels)
    return ClassificationDataset("flowers102", [base / "jpg" / f"image_{i:05d}.jpg" for i in ids],
                                 [int(labels[i - 1]) - 1 for i in ids], list(Flowers102.classes),
                                 package_templates("flowers102"))


CALTECH_RENAME = {"Faces": "face", "Faces_easy": "face (easy)", "Leopards": "leopard",
                  "Motorbikes": "motorbike", "airplanes": "airplane"}


def load_caltech101(root: str | os.PathLike, split: str = "test", train_per_class: int = 30, seed: int = 0,
                    **_) -> ClassificationDataset:
    """Caltech-101 (torchvision layout, BACKGROUND_Google dropped). The dataset has no official
    split: per class, `train_per_class` images drawn with `seed` are "train", the rest "test"
    (the usual 30-per-class protocol). The split is deterministic and recorded in the docs."""
    from torchvision.datasets import Caltech101
    root = Path(root)
    layout = "  ROOT/caltech101/101_ObjectCategories/<category>/image_0001.jpg ..."
    tv = _tv_dataset("caltech101", root, layout, "Caltech-101, https://data.caltech.edu/records/mzrjq-6wc02",
                     (root / "caltech101" / "101_ObjectCategories").is_dir(),
                     lambda: Caltech101(str(root), target_type="category", download=False))
    if split not in ("train", "test", "all"):
        raise ValueError(f"caltech101: split must be 'train', 'test' or 'all', got {split!r}")
    base = root / "caltech101" / "101_ObjectCategories"
    paths, targets = [], []
    rng = random.Random(seed)
    for c, cat in enumerate(tv.categories):
        idx = [k for k, y in zip(tv.index, tv.y) if y == c]
        chosen = set(rng.sample(idx, min(train_per_class, len(idx))))
        for k in idx:
            if split == "all" or (k in chosen) == (split == "train"):
                paths.append(base / cat / f"image_{k:04d}.jpg")
                targets.append(c)
    classes = [CALTECH_RENAME.get(c, humanize(c)) for c in tv.categories]
    return ClassificationDataset("caltech101", paths, targets, classes, package_templates("caltech101"))
