"""Multi-domain image datasets laid out DomainBed-style: the example list, in DomainBed's order.

A dataset is a folder ``root/<domain>/<class>/<image>``. Domains are the sorted
sub-folders of ``root``; inside a domain the examples are ordered exactly as
torchvision's ``ImageFolder`` orders them (classes sorted, then the sorted walk
of each class folder), because DomainBed's in/out split is defined on that
order. The class set must be identical across domains. Names must be UTF-8
(they are stored as text: the cache's paths, the file-list hash); entries
named like images that are not regular files (a FIFO, a socket) are skipped
with a warning, since reading one would block.

The DomainBed benchmarks can also be named (``PACS``, ``VLCS``, ``OfficeHome``,
``TerraIncognita``, ``DomainNet``) and are then looked up under a data root in
DomainBed's own folder names (``office_home``, ``terra_incognita``,
``domain_net``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linft.errors import LinftError

#: File extensions that count as images: torchvision ``ImageFolder``'s list, so
#: that the per-domain example order (and so DomainBed's split) is the same.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

@dataclass(frozen=True)
class DomainBedSpec:
    """Where DomainBed keeps a benchmark under its data root, and what it holds."""

    folder: str
    domains: tuple[str, ...]
    num_classes: int


#: The DomainBed benchmarks of the paper, by the names users type.
DOMAINBED_DATASETS: dict[str, DomainBedSpec] = {
    "PACS": DomainBedSpec("PACS", ("art_painting", "cartoon", "photo", "sketch"), 7),
    "VLCS": DomainBedSpec("VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5),
    "OfficeHome": DomainBedSpec("office_home", ("Art", "Clipart", "Product", "Real World"), 65),
    "TerraIncognita": DomainBedSpec(
        "terra_incognita", ("location_100", "location_38", "location_43", "location_46"), 10
    ),
    "DomainNet": DomainBedSpec(
        "domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345
    ),
}


# --------------------------------------------------------------------------- folders


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _utf8_name(folder, name: str, fix: str = "or move it out of the dataset") -> str:
    """``name`` (an entry of ``folder``), refused in one line when it is not UTF-8: names are stored as UTF-8 text
    (the cache's paths, the file-list hash), and Python reads other bytes as lone surrogates that cannot be."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(name)
        where = str(folder).encode("utf-8", "backslashreplace").decode()
        raise LinftError(f"the name {raw!r} in {where} is not UTF-8; rename it to UTF-8 "
                         f"(convmv -f latin1 -t utf8 -r FOLDER lists the renames; its notest option makes them) "
                         f"{fix}") from None
    return name


def _sorted_subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(_utf8_name(folder, entry.name) for entry in it if entry.is_dir())


def _is_special(path: str) -> bool:
    """Whether ``path`` exists but is not a regular file (a FIFO, socket or device, which a reader may block on).
    A dangling link is not special: reading it fails by name."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _warn_special(special: list[str]) -> None:
    """One warning for the entries :func:`_class_images` left out (not regular files)."""
    if special:
        warnings.warn(f"skipped {len(special)} entr{'y that is' if len(special) == 1 else 'ies that are'} not a "
                      f"regular file (a FIFO, socket or device) though named like an image: {', '.join(special[:3])}")


def _class_images(class_dir: Path, special: list[str]) -> list[str]:
    """Image files under one class folder, in ``ImageFolder``'s order, relative to it.

    Linked folders are followed (as ``ImageFolder`` does), but a link back to a
    folder already being walked (a loop) is refused, naming the link. Entries
    named like images that are not regular files are left out and added to
    ``special``; a name that is not UTF-8 is refused.
    """
    found = []
    for dirpath, _dirnames, filenames in sorted(os.walk(class_dir, followlinks=True)):
        real = os.path.realpath(dirpath)
        parts = Path(os.path.relpath(dirpath, class_dir)).parts
        if parts != (".",) and any(os.path.realpath(class_dir.joinpath(*parts[:k])) == real for k in range(len(parts))):
            raise LinftError(f"{dirpath} links back to {real}, a folder it is inside (a loop); remove the link")
        rel = os.path.relpath(dirpath, class_dir)
        for name in sorted(filenames):
            if not _is_image(name):
                continue
            path = name if rel == "." else f"{Path(rel).as_posix()}/{name}"
            _utf8_name(class_dir, path)
            if _is_special(os.path.join(dirpath, name)):
                special.append(os.path.join(dirpath, name))
            else:
                found.append(path)
    return found


def file_list_sha256(paths) -> str:
    """sha256 of the sorted relative file list (one posix path per line): the dataset's identity."""
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class MultiDomainDataset:
    """The example list of a DomainBed-style folder: paths, labels and domains, in DomainBed's order.

    ``paths`` are posix paths relative to ``root`` (``domain/class/file``);
    examples are grouped by domain in ``domains`` order.
    """

    root: Path
    domains: list[str]
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    domain_ids: np.ndarray
    name: str | None = None
    _sha: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def counts(self) -> dict[str, int]:
        """Number of images per domain."""
        per = np.bincount(self.domain_ids, minlength=len(self.domains))
        return {d: int(n) for d, n in zip(self.domains, per)}

    @property
    def class_counts(self) -> dict[str, dict[str, int]]:
        """Number of images per domain and class."""
        out = {}
        for i, d in enumerate(self.domains):
            per = np.bincount(self.labels[self.domain_ids == i], minlength=len(self.classes))
            out[d] = {c: int(n) for c, n in zip(self.classes, per)}
        return out

    @property
    def file_list_sha256(self) -> str:
        """sha256 of the sorted relative file list (see :func:`file_list_sha256`)."""
        if self._sha is None:
            self._sha = file_list_sha256(self.paths)
        return self._sha

    def domain_indices(self, domain: int | str) -> np.ndarray:
        """Global example indices of one domain, in the domain's own order (what splits index)."""
        i = self.domains.index(domain) if isinstance(domain, str) else int(domain)
        return np.flatnonzero(self.domain_ids == i)


def _common_classes(root: Path, domains: list[str]) -> list[str]:
    """The class folders, which every domain must have (the message lists the differences)."""
    per_domain_classes = {d: _sorted_subdirs(root / d) for d in domains}
    for d, cls in per_domain_classes.items():
        if not cls:
            raise LinftError(
                f"domain '{d}' in {root} has no images (no class sub-folders); "
                f"add {root / d}/<class>/<image> files or remove the folder"
            )
    union = sorted(set().union(*map(set, per_domain_classes.values())))
    differences = []
    for d, cls in per_domain_classes.items():
        missing = sorted(set(union) - set(cls))
        if missing:
            differences.append(f"'{d}' lacks {', '.join(missing)}")
    if differences:
        raise LinftError(
            "class sets differ across domains: " + "; ".join(differences)
            + "; every domain needs the same class folders"
        )
    return union


def load_image_folder(root: str | os.PathLike, name: str | None = None) -> MultiDomainDataset:
    """List a ``root/<domain>/<class>/<image>`` folder, checking the layout.

    Raises :class:`LinftError` for a missing or empty folder, a domain or a
    class folder without images, and class sets that differ across domains
    (the message lists the differences).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise LinftError(
            f"dataset folder {root} does not exist; pass a folder laid out "
            f"<dataset>/<domain>/<class>/<image>, or a DomainBed name ({', '.join(DOMAINBED_DATASETS)}) "
            f"with data_root=FOLDER", param="dataset"
        )
    if not root.is_dir():
        raise LinftError(f"dataset path {root} is not a folder; pass the folder that holds the domain folders")
    resolved = root.resolve()
    for folder in [*reversed(resolved.parents[:-1]), resolved]:  # the cache records where its dataset is, as text
        _utf8_name(folder.parent, folder.name, "or move the dataset to a folder whose path is UTF-8")
    domains = _sorted_subdirs(root)
    if not domains:
        raise LinftError(f"dataset folder {root} has no domain sub-folders; expected {root}/<domain>/<class>/<image>")

    classes = _common_classes(root, domains)

    paths: list[str] = []
    labels: list[int] = []
    domain_ids: list[int] = []
    special: list[str] = []
    for di, d in enumerate(domains):
        n_domain = 0
        for ci, c in enumerate(classes):
            files = _class_images(root / d / c, special)
            if not files:
                raise LinftError(
                    f"class '{c}' of domain '{d}' has no images ({', '.join(IMG_EXTENSIONS)}); "
                    f"add images to {root / d / c} or remove that class from every domain"
                )
            paths.extend(f"{d}/{c}/{f}" for f in files)
            labels.extend([ci] * len(files))
            n_domain += len(files)
        domain_ids.extend([di] * n_domain)
    _warn_special(special)
    return MultiDomainDataset(
        root=root,
        domains=domains,
        classes=classes,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        domain_ids=np.asarray(domain_ids, dtype=np.int64),
        name=name,
    )


def find_dataset(dataset: str | os.PathLike, data_root: str | os.PathLike | None = None) -> MultiDomainDataset:
    """A dataset by folder path, or by DomainBed name under ``data_root``.

    A name (``PACS``, ``officehome``, ... case-insensitive) is looked up as
    ``data_root/<DomainBed folder>``; ``data_root`` defaults to the
    ``LINFT_DATA_ROOT`` environment variable, then ``./data``. For a named
    benchmark the domain folders must be DomainBed's.
    """
    text = os.fspath(dataset)
    spec_name = next((k for k in DOMAINBED_DATASETS if k.lower() == text.lower()), None)
    if spec_name is None or Path(text).exists():
        return load_image_folder(text, name=Path(text).name or None)
    spec = DOMAINBED_DATASETS[spec_name]
    base = Path(data_root or os.environ.get("LINFT_DATA_ROOT") or "data").expanduser()
    folder = base / spec.folder
    if not folder.is_dir():
        raise LinftError(
            f"{spec_name} not found at {folder}; download it with DomainBed's "
            f"domainbed/scripts/download.py into {base}, or pass data_root=FOLDER", param="data_root"
        )
    ds = load_image_folder(folder, name=spec_name)
    missing = sorted(set(spec.domains) - set(ds.domains))
    if missing:
        raise LinftError(
            f"{folder} lacks the {spec_name} domain folders {', '.join(missing)} "
            f"(found {', '.join(ds.domains)}); check the download"
        )
    return ds



def load_class_folder(folder: str | os.PathLike, name: str | None = None) -> MultiDomainDataset:
    """One distribution laid out ``folder/<class>/<image>`` (ImageNet's val, ImageNet-A, ...) as a one-domain
    dataset: its domain is the folder's name, its classes the sorted class folders, each with images, listed
    in ``ImageFolder``'s order. The folder is resolved first (``.``, ``~``, links), so its name is its real name."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise LinftError(f"evaluation folder {folder} does not exist; pass a folder laid out <set>/<class>/<image>")
    classes = _sorted_subdirs(folder)
    if not classes:
        raise LinftError(f"evaluation folder {folder} has no class sub-folders; expected {folder}/<class>/<image>")
    paths, labels, special = [], [], []
    for ci, c in enumerate(classes):
        files = _class_images(folder / c, special)
        if not files:
            raise LinftError(f"class folder {folder / c} has no images ({', '.join(IMG_EXTENSIONS)}); add images "
                             "or remove it")
        paths.extend(f"{folder.name}/{c}/{f}" for f in files)
        labels.extend([ci] * len(files))
    _warn_special(special)
    return MultiDomainDataset(root=folder.parent, domains=[folder.name], classes=classes, paths=paths,
                              labels=np.asarray(labels, dtype=np.int64),
                              domain_ids=np.zeros(len(paths), dtype=np.int64), name=name or folder.name)


# --------------------------------------------------------------------------- outputs apart from datasets


#: Files linft writes into its own output folders (a report's summary, a sweep's records and plan): a folder that
#: holds one is linft's output, never a class folder, even when it holds images (a report's PNG figures).
LINFT_OUTPUT_FILES = frozenset({"summary.md", "records.jsonl", "planned.json"})


def _domain_classes(folder: str) -> frozenset | None:
    """The class folder names of ``folder`` when it is laid out as a domain (sub-folders, each with an image file
    directly inside and none of :data:`LINFT_OUTPUT_FILES`), else None. Reads one image name per class folder at
    most, and looks up the output files by name."""
    try:
        with os.scandir(folder) as it:
            classes = [e.path for e in it if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return None
    for path in classes:
        try:
            if any(os.path.isfile(os.path.join(path, name)) for name in LINFT_OUTPUT_FILES):
                return None
            with os.scandir(path) as it:
                if not any(e.is_file() and _is_image(e.name) for e in it):
                    return None
        except OSError:
            return None
    return frozenset(os.path.basename(p) for p in classes) or None


def dataset_holding(path: str | os.PathLike) -> Path | None:
    """The image dataset (``root/<domain>/<class>/<image>``) that ``path`` lies inside, or None.

    That is the closest folder above ``path`` whose sub-folders other than the one towards ``path`` (at least one;
    hidden ones aside) are all domains with the same class folders (:func:`_domain_classes`): a dataset however
    it is named or passed. ``path`` need not exist."""
    branch = Path(os.path.realpath(path))
    for folder in branch.parents:
        try:
            with os.scandir(folder) as it:
                others = [e.path for e in it if e.is_dir() and not e.name.startswith(".") and e.name != branch.name]
        except OSError:
            others = []
        first = _domain_classes(others[0]) if others else None
        if first is not None and all(_domain_classes(p) == first for p in others[1:]):
            return folder
        branch = folder
    return None


def check_output_apart(out: str | os.PathLike, datasets=(), *, param: str) -> None:
    """One LinftError (about ``param``) when the output ``out`` lies inside an image dataset (one of ``datasets``,
    or any folder laid out as one: :func:`dataset_holding`) or one of ``datasets`` lies inside ``out``: linft's files
    would then be read as a domain of the dataset, or the dataset as part of the output."""
    resolved = Path(os.path.realpath(out))
    for dataset in datasets:
        root = Path(os.path.realpath(dataset))
        if resolved == root or root in resolved.parents:
            raise LinftError(f"{param} {out} is inside the dataset {dataset}; its files would be read as part of the "
                             f"dataset: choose a {param} outside it", param=param)
        if resolved in root.parents:
            raise LinftError(f"the dataset {dataset} is inside {param} {out}; choose a {param} that does not hold "
                             f"the dataset", param=param)
    found = dataset_holding(resolved)
    if found is not None:
        raise LinftError(f"{param} {out} is inside the image dataset {found}; its files would be read as part of "
                         f"the dataset: choose a {param} outside it", param=param)
