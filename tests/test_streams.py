import torch

from supsup.data.streams import PermutedMNIST, RotatedMNIST, SplitMNIST


def test_permutations_are_fixed_by_seed_and_task_and_differ_between_tasks(mnist):
    a = PermutedMNIST(mnist, 4, seed=1)
    b = PermutedMNIST(mnist, 4, seed=1)  # a second construction, as another process would do
    perms = torch.stack([a.permutation(t) for t in range(4)])
    assert torch.equal(perms, torch.stack([b.permutation(t) for t in range(4)]))
    identity = torch.arange(784)
    for t in range(4):
        assert sorted(perms[t].tolist()) == identity.tolist()
        assert not torch.equal(perms[t], identity)  # task 0 is permuted too
    assert len({tuple(p.tolist()) for p in perms}) == 4
    assert not torch.equal(PermutedMNIST(mnist, 1, seed=2).permutation(0), perms[0])
    # a longer stream extends, not reshuffles, the shorter one
    assert torch.equal(PermutedMNIST(mnist, 6, seed=1).permutation(3), perms[3])


def test_a_stream_of_a_hundred_billion_tasks_costs_nothing_up_front(mnist):
    stream = PermutedMNIST(mnist, 100_000_000_000, seed=1)
    assert stream.batch(99_999_999_999, "test", torch.arange(2))[0].shape == (2, 784)
    assert RotatedMNIST(mnist, 100_000_000_000).angle(25_000_000_000) == 90.0


def test_fingerprint_identifies_the_tasks(mnist):
    a = PermutedMNIST(mnist, 4, seed=1).fingerprint()
    assert a == PermutedMNIST(mnist, 4, seed=1).fingerprint()
    assert len({a, PermutedMNIST(mnist, 4, seed=2).fingerprint(), PermutedMNIST(mnist, 5, seed=1).fingerprint(),
                RotatedMNIST(mnist, 4, seed=1).fingerprint(), SplitMNIST(mnist, 4, seed=1).fingerprint()}) == 5


def test_permuted_batch_is_normalised_then_permuted(mnist):
    stream = PermutedMNIST(mnist, 2, seed=1)
    idx = torch.arange(5)
    x, y = stream.batch(1, "train", idx)
    plain = (mnist.train_images[:5].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x, plain.flatten(1)[:, stream.permutation(1)])
    assert torch.equal(y, mnist.train_labels[:5])
    full = ((mnist.train_images.float() / 255 - 0.1307) / 0.3081)
    assert abs(full.mean().item()) < 1e-3 and abs(full.std().item() - 1) < 1e-3


def test_rotation_angles_and_a_quarter_turn(mnist):
    stream = RotatedMNIST(mnist, 4, seed=1)
    assert [stream.angle(t) for t in range(4)] == [0.0, 90.0, 180.0, 270.0]
    x0, _ = stream.batch(0, "test", torch.arange(3))
    x1, _ = stream.batch(1, "test", torch.arange(3))
    quarter = torch.rot90(x0.view(3, 28, 28), 1, dims=(1, 2))  # counter-clockwise
    assert (x1.view(3, 28, 28) - quarter).abs().max() < 1e-5


def test_split_mnist_tasks_hold_two_digits_each(mnist):
    stream = SplitMNIST(mnist, 5)
    sizes = [stream.size(t, "train") for t in range(5)]
    assert sum(sizes) == 60000
    for t in range(5):
        _, y = stream.test_set(t)
        assert set(y.unique().tolist()) == {2 * t, 2 * t + 1}


def test_train_batches_are_deterministic_and_cover_an_epoch(mnist):
    stream = PermutedMNIST(mnist, 1, seed=1)
    first = [y for _, y in stream.train_batches(0, 128, 3)]
    again = [y for _, y in stream.train_batches(0, 128, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    counts = torch.zeros(10)
    for _, y in stream.train_batches(0, 1000, 60):
        counts += torch.bincount(y, minlength=10)
    assert counts.tolist() == torch.bincount(mnist.train_labels, minlength=10).float().tolist()
