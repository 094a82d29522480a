import pytest

from supsup.data.idx import read_idx
from supsup.data.sources import MNIST, DataError, data_root, ensure_dataset, md5_of


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
