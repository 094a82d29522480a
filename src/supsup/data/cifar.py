"""CIFAR-100 from the standard ``cifar-100-python`` pickles, and the SplitCIFAR100 GG stream.

CIFAR cannot be fetched here: the files must already be under the data root, as
``<root>/cifar-100-python/{train,test,meta}`` (the extracted ``cifar-100-python.tar.gz``), or the archive
itself as ``<root>/cifar-100-python.tar.gz`` (its three regular files are extracted, never through a link nor
outside the data root). Every file is checked by md5 **before** it is read, and it is read without the
``pickle`` module: opcodes are parsed (``pickletools``) and only plain values and numpy arrays are built
(``read_pickle``).
"""

from __future__ import annotations

import os
import pickletools
import tarfile
from pathlib import Path

import numpy as np
import torch

from supsup.data.sources import (DataError, SourceError, copy_bounded, data_root, md5_of, refuse_in_the_way,
                                  regular_member, staging)
from supsup.data.vision import SplitClassStream, TensorImages

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
       "meta": "7973b15100ade9c7d40fb424638fde48"}
MAX_FILE = 256 << 20  #: bytes an extracted file may have (train, the largest, has 155 MB)
#: Normalisation used by the paper's SplitCIFAR100 runs (the CIFAR-10 constants, per spec §3.2).
MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)

class _ArrayStub:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)``: the array is made when BUILD gives its state."""


def _call(function: tuple[str, str], args: tuple):
    """The only calls a CIFAR pickle makes (to rebuild bytes, dtypes and arrays); anything else is refused."""
    module, name = function
    if (module, name) == ("_codecs", "encode") and len(args) == 2 and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")  # Python 3's protocol-2 spelling of bytes
    if (module, name) == ("numpy", "dtype"):
        spec = args[0].decode() if isinstance(args[0], bytes) else args[0]
        return np.dtype(spec)
    if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        return _ArrayStub()
    raise DataError(f"refusing to unpickle {module}.{name}: not part of the CIFAR format")


def _build(obj, state):
    """BUILD: an array's (version, shape, dtype, fortran, raw bytes), or a dtype's byte order."""
    if isinstance(obj, _ArrayStub):
        _, shape, dtype, fortran, raw = state
        return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()
    if isinstance(obj, np.dtype):
        return obj.newbyteorder(state[1]) if state[1] in ("<", ">") else obj
    raise DataError(f"refusing to unpickle: BUILD on {type(obj).__name__} is not part of the CIFAR format")


def read_pickle(path: Path) -> dict:
    """Read a CIFAR file (a protocol-2 pickle of dicts, lists, bytes, ints and numpy arrays; keys as bytes).

    The ``pickle`` module is never used: ``pickletools.genops`` only parses opcodes, and this small stack
    machine builds plain values, calling nothing but bytes encoding, ``numpy.dtype`` and ``numpy.frombuffer``."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        items = stack[marks[-1]:]
        del stack[marks.pop():]
        return items

    with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                return stack.pop()
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("BINSTRING", "SHORT_BINSTRING"):
                stack.append(arg.encode("latin-1"))  # a Python 2 str: bytes, as with encoding="bytes"
            elif name in ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
                          "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
                stack.append(arg)
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                size = int(name[-1])
                items = tuple(stack[-size:])
                del stack[-size:]
                stack.append(items)
            elif name == "APPEND":
                value = stack.pop()
                stack[-1].append(value)
            elif name == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                stack[-1][key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                stack[-1].update(zip(items[::2], items[1::2]))
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "GLOBAL":
                stack.append(tuple(arg.split(" ", 1)))
            elif name == "STACK_GLOBAL":
                qualname, module = stack.pop(), stack.pop()
                stack.append((module, qualname))
            elif name == "REDUCE":
                args, function = stack.pop(), stack.pop()
                stack.append(_call(function, args))
            elif name == "BUILD":
                state = stack.pop()
                stack.append(_build(stack.pop(), state))
            else:
                raise DataError(f"{path}: pickle opcode {name} is not part of the CIFAR format")
    raise DataError(f"{path}: truncated pickle (no STOP opcode)")


def _missing_message(folder: Path) -> str:
    return (f"CIFAR-100 not found. Put the extracted python version of CIFAR-100 at {folder}/ "
            f"(files train, test and meta, md5 {MD5['train']}, {MD5['test']}, {MD5['meta']}), or the archive "
            f"{ARCHIVE} (169,001,437 bytes, md5 {ARCHIVE_MD5}) at {folder.parent}/{ARCHIVE}. It cannot be "
            f"downloaded from here; set --data-root or $SUPSUP_DATA to the folder that holds it.")


def _extract_archive(root: Path, folder: Path, verify: bool) -> None:
    """Extract train, test and meta into ``folder``: regular members only, each built in a temporary folder and
    moved into place, so nothing is written through a link or outside the data root."""
    archive = root / ARCHIVE
    if verify and (got := md5_of(archive)) != ARCHIVE_MD5:
        raise DataError(f"checksum mismatch for {archive}: md5 {got}, expected {ARCHIVE_MD5}. "
                        f"Replace it with the original archive.")
    if not folder.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{folder} is a link to {folder.resolve()}, outside the data root, where extraction does not "
                        f"write: remove the link, or extract {ARCHIVE} there yourself.")
    for name in MD5:
        if (folder / name).is_symlink():
            raise DataError(f"{folder / name} is a link, which extraction will not write through: remove it and "
                            f"run again.")
    try:
        with staging(folder) as tmp, tarfile.open(archive) as tar:
            for name in MD5:
                member = regular_member(tar, f"{FOLDER}/{name}", MAX_FILE)
                copy_bounded(tar.extractfile(member), tmp / name, MAX_FILE, f"{ARCHIVE}:{member.name}")
            for name in MD5:
                os.replace(tmp / name, folder / name)
    except (SourceError, tarfile.TarError) as why:
        raise DataError(f"cannot extract {archive} ({why}): replace it with the original archive.") from why


def load_cifar100(root=None, device: torch.device | str = "cpu", *, md5: dict[str, str] | None = None,
                  verify: bool = True) -> TensorImages:
    """CIFAR-100 train (50,000) / test (10,000) as ``[N, 3, 32, 32] uint8`` with fine labels 0..99.

    ``md5`` overrides the expected checksums and ``verify=False`` skips them: both exist for tests on
    synthetic files only."""
    root = data_root(root)
    folder = root / FOLDER
    refuse_in_the_way(root, [ARCHIVE])
    refuse_in_the_way(folder, MD5)
    expected = {**MD5, **(md5 or {})}
    if not all((folder / f).is_file() for f in MD5):
        if (root / ARCHIVE).is_file():
            _extract_archive(root, folder, verify and md5 is None)
        else:
            raise DataError(_missing_message(folder))
    for name, digest in expected.items():
        got = md5_of(folder / name)
        if verify and got != digest:
            raise DataError(f"CIFAR-100: checksum mismatch for {folder / name}: md5 {got}, expected {digest}. "
                            f"Replace it with the original file.")
    arrays = {}
    for split in ("train", "test"):
        raw = read_pickle(folder / split)
        data = np.asarray(raw[b"data"], dtype=np.uint8)
        labels = np.asarray(raw[b"fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
            raise DataError(f"{folder / split}: expected data [N, 3072] and N labels, got {data.shape} / "
                            f"{labels.shape}")
        arrays[split] = (torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))
    meta = read_pickle(folder / "meta")
    num_classes = len(meta[b"fine_label_names"])
    return TensorImages("cifar100", *arrays["train"], *arrays["test"], MEAN, STD,
                        f"files in {folder}", num_classes).to(device)


class SplitCIFAR100(SplitClassStream):
    """20 tasks × 5 classes from a seeded class permutation; labels 0..4; RandomCrop 32 (pad 4) + flip."""

    name = "split-cifar100"
    crop_padding = 4
    flip = True

    def __init__(self, data: TensorImages, num_tasks: int = 20, classes_per_task: int = 5, seed: int = 0):
        super().__init__(data, num_tasks, classes_per_task, seed)
