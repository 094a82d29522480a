import errno
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from supsup.architectures import build_model
from supsup.baselines import lower_bound
from supsup.data import cifar
from supsup.data.cifar import MD5, SplitCIFAR100, load_cifar100
from supsup.data.sources import DataError
from supsup.density import er_density
from supsup.gg import paper_gg_config, run_gg
from supsup.resnets import gem_resnet18


def _write_cifar(folder, per_class_train=3, per_class_test=2):
    """Synthetic files in the exact cifar-100-python format (Python-2 style pickles, bytes keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (100, 3072), dtype=np.uint8)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), n)
        data = patterns[labels]
        content = {b"filenames": [b"x.png"] * len(labels), b"batch_label": split.encode(), b"fine_labels": labels.tolist(),
                   b"coarse_labels": (labels // 5).tolist(), b"data": data}
        (folder / split).write_bytes(pickle.dumps(content, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in MD5}


@pytest.fixture
def cifar_root(tmp_path):
    md5 = _write_cifar(tmp_path / "cifar-100-python")
    return tmp_path, md5


def test_missing_cifar_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar100(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and "train, test and meta" in msg and MD5["train"] in msg


def test_files_are_checked_before_unpickling(cifar_root, monkeypatch):
    root, _ = cifar_root
    unpickled = []
    monkeypatch.setattr("supsup.data.cifar.read_pickle", lambda p: unpickled.append(p))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar100(root)  # the synthetic files do not have the real md5s
    assert unpickled == []


def test_loads_synthetic_files_with_their_checksums(cifar_root):
    root, md5 = cifar_root
    data = load_cifar100(root, md5=md5)
    assert data.train_images.shape == (300, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_labels.shape == (200,) and data.num_classes == 100


def test_archive_is_verified_and_extracted(tmp_path):
    md5 = _write_cifar(tmp_path / "src" / "cifar-100-python")
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar100(tmp_path)
    assert load_cifar100(tmp_path, md5=md5).train_images.shape[0] == 300


def _archive(root, link=None):
    """``root/cifar-100-python.tar.gz`` of synthetic files (member ``link``, if given, a symbolic link out of the
    root instead); returns their md5s."""
    md5 = _write_cifar(root.parent / "src" / "cifar-100-python")
    root.mkdir(exist_ok=True)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name in MD5:
            if name == link:
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
                tar.addfile(info)
            else:
                tar.add(root.parent / "src" / "cifar-100-python" / name, arcname=f"cifar-100-python/{name}")
    return md5


def _outside(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not to be touched")
    return outside


@pytest.mark.parametrize("target", ["a file", "nothing"])
def test_extraction_refuses_a_link_where_it_would_write(tmp_path, target):
    root = tmp_path / "root"
    md5 = _archive(root)
    outside = _outside(tmp_path) if target == "a file" else tmp_path / "nowhere"
    (root / "cifar-100-python").mkdir()
    (root / "cifar-100-python" / "train").symlink_to(outside)
    with pytest.raises(DataError, match=f"{root / 'cifar-100-python' / 'train'} is a link, which extraction will not"):
        load_cifar100(root, md5=md5)
    assert os.listdir(root / "cifar-100-python") == ["train"]
    assert outside.read_bytes() == b"not to be touched" if target == "a file" else not outside.exists()


def test_extraction_refuses_a_folder_linked_outside_the_root(tmp_path):
    root = tmp_path / "root"
    md5 = _archive(root)
    (tmp_path / "elsewhere").mkdir()
    (root / "cifar-100-python").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="cifar-100-python is a link to .*elsewhere, outside the data root"):
        load_cifar100(root, md5=md5)
    assert os.listdir(tmp_path / "elsewhere") == []
    (root / "cifar-100-python").unlink()
    (root / "inside").mkdir()
    (root / "cifar-100-python").symlink_to(root / "inside")  # a link within the data root is followed
    assert load_cifar100(root, md5=md5).train_images.shape[0] == 300
    assert sorted(os.listdir(root / "inside")) == sorted(MD5)


@pytest.mark.parametrize("problem", ["link", "too large"])
def test_archive_members_that_are_links_or_too_large_are_refused(tmp_path, monkeypatch, problem):
    root = tmp_path / "root"
    outside = _outside(tmp_path)
    if problem == "too large":
        monkeypatch.setattr(cifar, "MAX_FILE", 1 << 20)  # the synthetic train file has 1.4 MB
    md5 = _archive(root, link="test" if problem == "link" else None)
    with pytest.raises(DataError, match="cannot extract .*cifar-100-python.tar.gz .*: replace it") as err:
        load_cifar100(root, md5=md5)
    assert {"link": "cifar-100-python.tar.gz:cifar-100-python/test is a link or special file",
            "too large": "cifar-100-python.tar.gz:cifar-100-python/train has 1,"}[problem] in str(err.value)
    assert os.listdir(root / "cifar-100-python") == [] and outside.read_bytes() == b"not to be touched"


@pytest.mark.parametrize("with_archive", [False, True])
def test_a_folder_where_a_cifar_file_should_be_is_an_error_naming_it(tmp_path, with_archive):
    md5 = _archive(tmp_path / "root") if with_archive else None
    (tmp_path / "root" / "cifar-100-python" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="cifar-100-python/train should be a data file but is a folder"):
        load_cifar100(tmp_path / "root", md5=md5)
    assert os.listdir(tmp_path / "root" / "cifar-100-python") == ["train"]


def test_a_failed_write_during_extraction_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "root"
    md5 = _archive(root)

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(cifar.os, "replace", read_only)
    with pytest.raises(DataError, match="cannot write in .*cifar-100-python .*Read-only file system.*--data-root"):
        load_cifar100(root, md5=md5)
    assert os.listdir(root / "cifar-100-python") == []


def test_unpickling_refuses_anything_but_the_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    md5 = _write_cifar(folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "train").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    md5["train"] = hashlib.md5((folder / "train").read_bytes()).hexdigest()
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar100(tmp_path, md5=md5)


def test_split_cifar100_is_20_disjoint_tasks_of_5_with_labels_0_to_4(cifar_root):
    root, md5 = cifar_root
    stream = SplitCIFAR100(load_cifar100(root, md5=md5), seed=3)
    assert stream.num_tasks == 20
    assert sorted(stream.task_classes.flatten().tolist()) == list(range(100))
    assert not torch.equal(stream.task_classes.flatten(), torch.arange(100))  # a seeded permutation
    assert torch.equal(SplitCIFAR100(stream.data, seed=3).task_classes, stream.task_classes)
    x, y = stream.test_set(7)
    assert x.shape == (10, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    raw = stream.data.test_images[stream.indices["test"][7]].float() / 255
    assert torch.allclose(x[:, 0], (raw[:, 0] - 0.491) / 0.247)  # the spec's normalisation


def test_augmentation_only_in_training_batches(cifar_root):
    root, md5 = cifar_root
    stream = SplitCIFAR100(load_cifar100(root, md5=md5), seed=0)
    idx = torch.arange(15)
    assert torch.equal(stream.batch(0, "train", idx)[0], stream.batch(0, "train", idx)[0])
    augmented, y = next(stream.train_batches(0, 15, 1))
    plain, y2 = stream.batch(0, "train", torch.arange(15))
    assert augmented.shape == plain.shape == (15, 3, 32, 32)
    # same samples, labels kept; pixels moved by crops/flips (a padded crop brings in black borders)
    assert sorted(y.tolist()) == sorted(y2.tolist())
    black = (0 - torch.tensor([0.491, 0.482, 0.447])) / torch.tensor([0.247, 0.243, 0.262])
    assert (augmented[:, :, 0, :] == black.view(1, 3, 1)).any() or (augmented[:, :, :, 0] == black.view(1, 3, 1)).any()
    again, _ = next(stream.train_batches(0, 15, 1))
    assert torch.equal(augmented, again)  # seeded


def test_split_cifar100_end_to_end_gg(cifar_root):
    """SupSup with the reduced ResNet-18 learns 2 tasks; its end-of-run accuracy equals its accuracy right
    after each task; a baseline runs on the same stream."""
    root, md5 = cifar_root
    stream = SplitCIFAR100(load_cifar100(root, md5=md5), seed=0)
    model = build_model("gem_resnet18", output_size=5, num_classes=5, seed=0, rule="topk", density=er_density(32),
                        nf=4)
    result = run_gg(model, stream, paper_gg_config(batches_per_task=3, batch_size=5), num_tasks=2)
    assert result.at_end == result.after_task and len(result.at_end) == 2
    bn_channels = sum(bn.num_features for bn in model.norm_layers())
    masks = sum(layer.bank.nbytes_per_task for layer in model.mask_layers())
    assert model.bytes_per_task() == masks + 2 * bn_channels * 4  # masks + BN mean/var (fp32) per task
    assert result.bytes_stored == 2 * model.bytes_per_task()
    lb = lower_bound(lambda: gem_resnet18(5, nf=4), stream, paper_gg_config(batches_per_task=2, batch_size=5), num_tasks=2)
    assert len(lb.at_end) == 2


def _python2_pickle(raw: bytes) -> bytes:
    """A protocol-2 pickle as Python 2 wrote CIFAR (str keys and array bytes as BINSTRING), by hand."""
    def s(b: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(b)]) + b
    dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01K\x02K\x03\x86" + dtype + b"\x89" + s(raw) + b"tb")
    return b"\x80\x02}(" + s(b"data") + array + s(b"fine_labels") + b"](K\x05K\x07eu."


@pytest.mark.parametrize("python", [2, 3])
def test_reader_gives_what_pickle_gives_without_the_pickle_module(tmp_path, python):
    from supsup.data.cifar import read_pickle

    raw = bytes(range(6))
    if python == 2:
        data = _python2_pickle(raw)
    else:
        data = pickle.dumps({b"data": np.frombuffer(raw, np.uint8).reshape(2, 3), b"fine_labels": [5, 7],
                             b"batch_label": b"b", b"names": ["é", b"x"], b"flag": True}, protocol=2)
    (tmp_path / "f").write_bytes(data)
    got, want = read_pickle(tmp_path / "f"), pickle.loads(data, encoding="bytes")
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], np.ndarray):
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key])
        else:
            assert got[key] == want[key]
    assert np.array_equal(got[b"data"], [[0, 1, 2], [3, 4, 5]])


def test_reader_refuses_other_opcodes_and_truncated_files(tmp_path):
    from supsup.data.cifar import read_pickle

    (tmp_path / "obj").write_bytes(pickle.dumps({b"x": {1, 2}}, protocol=2))  # a set: not in the format
    with pytest.raises(DataError, match="refusing to unpickle|not part of the CIFAR format"):
        read_pickle(tmp_path / "obj")
    (tmp_path / "cut").write_bytes(pickle.dumps({b"x": [1, 2]}, protocol=2)[:-1])
    with pytest.raises((DataError, ValueError)):
        read_pickle(tmp_path / "cut")
