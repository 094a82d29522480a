"""Superposition from packed bits equals the float reference: kernel by kernel (every backend this
machine has, both storage layouts, the Triton kernel on a GPU), on trained masks with real images, and
through the layers' autograd (values, α-gradients and input gradients; shared and per-sample α; Linear
and Conv2d)."""

import os

import pytest
import torch

from supsup import alpha_gradient, build_model, kernels
from supsup import layers as layers_module
from supsup.data.streams import PermutedMNIST
from supsup.learners import TrainConfig, train_task_group
from supsup.layers import SupermaskConv2d, SupermaskLinear, Superposition
from supsup.masks import pack_bits


def cpu_backends():
    names = ["torch"]
    if kernels.native.available():
        names.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton_available():
        names.append("triton")  # Triton's interpreter runs the GPU kernel on the CPU
    return names


def layouts(device):
    return ["rows", "tiles"] if kernels.tiled(device) else ["rows"]


def in_layout(rows, layout):
    """``rows [k, R]`` as given, or copied into a tile store (the CPU bank's layout) and viewed as its k tasks."""
    if layout == "rows":
        return rows
    store = kernels.new_store(rows.shape[0] + 5, rows.shape[1], rows.device)  # spare capacity: a strided view
    kernels.write_rows(store, 0, rows)
    return kernels.tasks(store, slice(0, rows.shape[0]))


# (k, P): k below, at and past the 16 tasks of a vector; P with tails of a byte and of a 32-weight column
CASES = [(1, 8), (3, 91), (16, 32 * 37), (17, 1000), (40, 1000), (70, 4099), (5, 8 * 300 + 3)]
TOL = dict(rtol=1e-5, atol=1e-4)  # float32 sums in another order than the matmul reference


def reference(masks, g, alpha):
    stack = masks.float()
    return g @ stack.T, alpha @ stack


def check_backend(name, device, layout):
    gen = torch.Generator().manual_seed(0)
    for k, p in CASES:
        masks = torch.rand(k, p, generator=gen) < 0.5
        packed = in_layout(pack_bits(masks).to(device), layout)
        g, alpha = torch.randn(4, p, generator=gen), torch.randn(2, k, generator=gen)
        g[2] = 0  # all zero: every column skipped
        g[3, : p // 2] = 0  # a zero stretch, then no zero
        alpha[1, ::2] = 0  # zero mixing weights are skipped
        want_c, want_s = reference(masks, g, alpha)
        with kernels.use_backend(name):
            got_c = kernels.contract(packed, g.to(device)).cpu()
            got_c1 = kernels.contract(packed, g[0].to(device)).cpu()
            got_s = kernels.superpose(packed, alpha.to(device), p).cpu()
            got_s1 = kernels.superpose(packed, alpha[1].to(device), p).cpu()
            unpacked = kernels.unpack(packed, p, g[0].to(device)).cpu()
            ones = kernels.unpack(kernels.tasks(packed, slice(k - 1, k)), p).cpu()
        assert torch.allclose(got_c, want_c, **TOL), (name, layout, k, p, (got_c - want_c).abs().max())
        assert torch.equal(got_c[2], torch.zeros(k))
        assert torch.allclose(got_c1, want_c[0], **TOL)
        assert torch.allclose(got_s, want_s, **TOL), (name, layout, k, p, (got_s - want_s).abs().max())
        assert torch.allclose(got_s1, want_s[1], **TOL)
        assert torch.equal(unpacked, masks.float() * g[0])
        assert torch.equal(ones[0], masks[-1].float())


@pytest.mark.parametrize("name", cpu_backends())
@pytest.mark.parametrize("layout", layouts("cpu"))
def test_kernels_equal_the_float_reference_on_random_masks(name, layout):
    check_backend(name, torch.device("cpu"), layout)


@pytest.mark.parametrize("name", cpu_backends())
@pytest.mark.parametrize("layout", layouts("cpu"))
def test_contraction_skips_zero_stretches_of_the_gradient_exactly(name, layout):
    """Dead ReLUs zero whole rows of g = ∂L/∂W_eff ⊙ W, zero inputs scattered columns; skipping changes nothing."""
    gen = torch.Generator().manual_seed(4)
    masks = torch.rand(40, 300, 50, generator=gen) < 0.5  # [k, out, in]: 300 rows of 50 weights
    delta = torch.randn(300, 1, generator=gen) * (torch.rand(300, 1, generator=gen) < 0.3)  # 70% of rows zero
    x = torch.randn(1, 50, generator=gen) * (torch.rand(1, 50, generator=gen) < 0.4)  # 60% of inputs zero
    g = (delta * x).reshape(-1)
    flat = masks.reshape(40, -1)
    packed = in_layout(pack_bits(flat), layout)
    with kernels.use_backend(name):
        got = kernels.contract(packed, g)
        dead = g.clone()
        dead[(delta[:, 0] == 0).nonzero()[0, 0] * 50] = float("nan")  # a NaN in a skipped stretch is not skipped
        poisoned = kernels.contract(packed, dead)
    assert torch.allclose(got, flat.float() @ g, **TOL)
    assert poisoned[flat[:, (delta[:, 0] == 0).nonzero()[0, 0] * 50]].isnan().all()


@pytest.mark.parametrize("name", cpu_backends())
@pytest.mark.parametrize("layout", layouts("cpu"))
def test_factored_contraction_equals_the_contraction_of_the_outer_product(name, layout):
    """δᵀ(W ⊙ M)x from the factors: rows of 7 (< one column), 50 and 100 inputs (columns across rows), P not a
    multiple of 32, several samples, dead rows (δ = 0) and zero inputs; the native kernel forms the same g."""
    gen = torch.Generator().manual_seed(8)
    for out, inp, k in [(5, 7, 3), (300, 50, 17), (61, 100, 40)]:
        weight = torch.randn(out, inp, generator=gen)
        masks = torch.rand(k, out * inp, generator=gen) < 0.5
        delta = torch.randn(4, out, generator=gen) * (torch.rand(4, out, generator=gen) < 0.5)
        x = torch.relu(torch.randn(4, inp, generator=gen))
        delta[1] = 0
        g = ((delta[:, :, None] * x[:, None, :]) * weight).reshape(4, -1)
        packed = in_layout(pack_bits(masks), layout)
        with kernels.use_backend(name):
            got = kernels.contract_factored(packed, delta, x, weight)
            formed = kernels.contract(packed, g)
        assert torch.allclose(got, g @ masks.float().T, **TOL), (out, inp, k, (got - g @ masks.float().T).abs().max())
        assert torch.equal(got, formed) and torch.equal(got[1], torch.zeros(k))


@pytest.mark.skipif(not kernels.native.available(), reason="no native kernels")
def test_native_kernels_on_two_threads_equal_the_reference():
    """Work above native.THREADS_FROM_BYTES is split over column ranges of two threads (partial sums added)."""
    gen = torch.Generator().manual_seed(9)
    k, out, inp = 70, 300, 1000  # 70 × 37,500 bytes of masks: two threads
    masks = torch.rand(k, out * inp, generator=gen) < 0.5
    packed = in_layout(pack_bits(masks), "tiles")
    weight = torch.randn(out, inp, generator=gen)
    delta, x = torch.randn(2, out, generator=gen), torch.randn(2, inp, generator=gen)
    g = ((delta[:, :, None] * x[:, None, :]) * weight).reshape(2, -1)
    alpha = torch.randn(2, k, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert kernels.native._threads(4 * k * packed.shape[0]) == 2
        got = kernels.contract(packed, g), kernels.contract_factored(packed, delta, x, weight), \
            kernels.superpose(packed, alpha, out * inp)
    finally:
        torch.set_num_threads(threads)
    stack = masks.float()
    assert torch.allclose(got[0], g @ stack.T, rtol=1e-4, atol=1e-2) and torch.equal(got[0], got[1])
    assert torch.allclose(got[2], alpha @ stack, rtol=1e-4, atol=1e-3)


def test_tiles_hold_the_rows_exactly_and_grow_without_loss():
    if not kernels.tiled("cpu"):
        pytest.skip(f"no native kernels: {kernels.native.why_unavailable()}")
    gen = torch.Generator().manual_seed(5)
    for k, row_bytes in [(1, 1), (19, 5), (40, 3750)]:
        rows = torch.randint(0, 256, (k, row_bytes), dtype=torch.uint8, generator=gen)
        store = kernels.new_store(k, row_bytes)
        cap = k if k < kernels.TILE_TASKS else -(-k // kernels.TILE_TASKS) * kernels.TILE_TASKS
        assert store.shape == ((row_bytes + 3) // 4, cap, 4)
        kernels.write_rows(store, 0, rows[: k // 2])
        kernels.write_rows(store, k // 2, rows[k // 2 :])
        assert torch.equal(kernels.rows(kernels.tasks(store, slice(0, k)), row_bytes), rows)
        picked = torch.tensor([k - 1, 0])
        assert torch.equal(kernels.rows(kernels.tasks(store, picked), row_bytes), rows[picked])
        assert torch.equal(kernels._torch_rows(kernels.tasks(store, slice(0, k)), row_bytes), rows)  # the GPU's way
        assert kernels.relayout(store, row_bytes) is store
        moved = kernels.relayout(rows.clone(), row_bytes)  # rows arriving on the CPU become tiles
        assert moved.dim() == 3 and torch.equal(kernels.rows(kernels.tasks(moved, slice(0, k)), row_bytes), rows)


def test_select_is_torch_where_bit_for_bit():
    """The effective weights of trained masks (given, or the threshold rule's s >= 0): same values and the same
    +0.0 where the mask drops a weight."""
    gen = torch.Generator().manual_seed(6)
    for shape in [(3, 7), (4, 64), (2, 33, 5)]:
        weight = torch.randn(shape, generator=gen)
        keep = torch.rand(3, *shape, generator=gen) < 0.5
        got, want = kernels.select(keep, weight), torch.where(keep, weight, 0.0)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
        scores = torch.randn(3, *shape, generator=gen)
        scores.view(-1)[:3] = torch.tensor([-0.0, 0.0, float("nan")])
        got, want = kernels.threshold_select(scores, weight), torch.where(scores >= 0, weight, 0.0)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_native_kernels_without_avx512_equal_the_reference(tmp_path):
    """The portable C path (built for a CPU without AVX-512) gives the same results."""
    if not kernels.native.available():
        pytest.skip(f"no native kernels: {kernels.native.why_unavailable()}")
    script = (
        "import torch\n"
        "from supsup.kernels import native\n"
        "native._FLAGS[native._FLAGS.index('-march=native')] = '-march=x86-64'\n"
        "import supsup.kernels as K\n"
        "from supsup.masks import pack_bits\n"
        "assert native.available(), native.why_unavailable()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for k, p in [(3, 91), (40, 4099)]:\n"
        "    m = torch.rand(k, p, generator=g) < 0.5\n"
        "    t = K.new_store(k, (p + 7) // 8); K.write_rows(t, 0, pack_bits(m)); t = K.tasks(t, slice(0, k))\n"
        "    v = torch.randn(2, p, generator=g); v[:, 64:640] = 0\n"
        "    a = torch.randn(2, k, generator=g); a[:, 1] = 0\n"
        "    assert torch.allclose(native.contract(t, v), v @ m.float().T, rtol=1e-5, atol=1e-4)\n"
        "    assert torch.allclose(native.superpose(t, a, p), a @ m.float(), rtol=1e-5, atol=1e-4)\n"
        "    assert torch.equal(native.unpack(t, p, v[0]), m.float() * v[0])\n"
        "    assert torch.equal(K.rows(t, (p + 7) // 8), pack_bits(m))\n"
        "    w = torch.randn(1, p, generator=g); d = torch.randn(2, 1, generator=g)\n"
        "    want = (d * v * w) @ m.float().T\n"
        "    assert torch.allclose(native.contract_factored(t, d, v, w), want, rtol=1e-5, atol=1e-4)\n"
        "    keep = torch.rand(2, p, generator=g) < 0.5\n"
        "    assert torch.equal(native.select(keep, v[0]), torch.where(keep, v[0], 0.0))\n"
        "    assert torch.equal(native.threshold_select(v, v[1]), torch.where(v >= 0, v[1], 0.0))\n"
    )
    import subprocess
    import sys

    env = {**os.environ, "SUPSUP_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def mnist_lenet(mnist, one_thread):
    """LeNet with 3 tasks trained on PermutedMNIST (masks learned from real data) and real test images."""
    stream = PermutedMNIST(mnist, 3, seed=2)
    model = build_model("lenet", output_size=50, seed=2)
    for _ in range(3):
        train_task_group(model, stream, TrainConfig(batches_per_task=30))
    return model, torch.cat([stream.test_set(t)[0][:6] for t in range(3)])


@pytest.mark.skipif(not kernels.native.available(), reason="no native kernels")
def test_alpha_gradients_on_trained_masks_and_real_images_equal_the_float_reference(mnist_lenet):
    model, x = mnist_lenet
    k = model.num_tasks
    gen = torch.Generator().manual_seed(7)
    cases = [(x[:1], torch.full((k,), 1 / k), True), (x, torch.rand(k, generator=gen), False),
             (x, torch.rand(x.shape[0], k, generator=gen), False), (x, torch.full((x.shape[0], k), 1 / k), True)]
    for xs, alpha, uniform in cases:
        got = alpha_gradient(model, xs, alpha, uniform=uniform)
        with kernels.use_backend("torch"):
            want = alpha_gradient(model, xs, alpha, uniform=uniform)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (tuple(alpha.shape), (got - want).abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_gpu_kernels_equal_the_float_reference_on_random_masks(name):
    if name == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed")
    check_backend(name, torch.device("cuda"), "rows")


@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.triton_available(), reason="needs triton and a GPU")
def test_triton_contract_equals_the_cpu_kernel_on_many_masks():
    gen = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (3000, 3750), dtype=torch.uint8, generator=gen)  # LeNet's 2nd layer, k = 3000
    g = torch.randn(30_000, generator=gen)
    alpha = torch.rand(3000, generator=gen)
    cpu_c, cpu_s = kernels.contract(packed, g), kernels.superpose(packed, alpha, 30_000)
    with kernels.use_backend("triton"):
        gpu_c = kernels.contract(packed.cuda(), g.cuda()).cpu()
        gpu_s = kernels.superpose(packed.cuda(), alpha.cuda(), 30_000).cpu()
    assert torch.allclose(gpu_c, cpu_c, rtol=1e-4, atol=1e-2)
    assert torch.allclose(gpu_s, cpu_s, rtol=1e-4, atol=1e-2)


# ------------------------------------------------------------------------------ through the layers
def make_layer(kind, k, device):
    gen = torch.Generator().manual_seed(2)
    if kind == "linear":
        layer, x = SupermaskLinear(37, 11, seed=1), torch.randn(5, 37, generator=gen)
    else:
        layer, x = SupermaskConv2d(3, 4, 3, padding=1, seed=1), torch.randn(5, 3, 6, 6, generator=gen)
    layer.bank.add(torch.rand(k, *layer.weight.shape, generator=gen) < 0.5)
    return layer.to(device), x.to(device)


def float_reference(layer, x, alpha):
    """f(x_b; W ⊙ Σ_i α_(b)i M_i) through a float [k, P] stack: the formula, not the kernels."""
    stack = layer.bank.masks(torch.arange(layer.bank.num_tasks), torch.float32)
    if alpha.dim() == 1:
        return layer._forward_with(x, layer.weight * torch.einsum("k,k...->...", alpha, stack))
    return torch.cat([layer._forward_with(x[b : b + 1], layer.weight * torch.einsum("k,k...->...", alpha[b], stack))
                      for b in range(x.shape[0])])


def values_and_grads(fn, x, alpha, probe):
    x = x.clone().requires_grad_(True)
    alpha = alpha.clone().requires_grad_(True)
    y = fn(x, alpha)
    gx, ga = torch.autograd.grad((y * probe).sum(), [x, alpha])
    return y.detach(), ga, gx


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["shared", "shared-uniform", "per-sample", "per-sample-uniform",
                                  "per-sample-chunked", "per-sample-chunked-uniform"])
def test_superposition_from_bits_equals_the_float_reference(kind, mode, monkeypatch):
    k = 23
    layer, x = make_layer(kind, k, torch.device("cpu"))
    uniform = mode.endswith("uniform")
    shape = (k,) if mode.startswith("shared") else (x.shape[0], k)
    alpha = torch.full(shape, 1.0 / k) if uniform else torch.rand(shape, generator=torch.Generator().manual_seed(3))
    if "chunked" in mode:  # force the large-batch path: tasks in chunks of unpacked masks
        monkeypatch.setattr(layers_module, "PER_SAMPLE_WEIGHT_BUDGET", 0)
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 5 * layer.weight.numel())

    def routed(x, alpha):
        layer.route = Superposition(alpha, uniform=uniform)
        try:
            return layer(x)
        finally:
            layer.route = None

    probe = torch.randn_like(float_reference(layer, x, alpha))
    got = values_and_grads(routed, x, alpha, probe)
    want = values_and_grads(lambda x, a: float_reference(layer, x, a), x, alpha, probe)
    for a, b, what in zip(got, want, ("values", "alpha-gradient", "input-gradient")):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (what, (a - b).abs().max())


def test_triton_topk_cutoffs_equal_kthvalue_in_the_interpreter():
    """The batched radix select (the GPU top-k path) run by Triton's interpreter on the CPU: same cuts as
    one kthvalue per segment, on segments spanning several chunks, ties, ±0.0, keep-all and keep-none."""
    pytest.importorskip("triton")
    script = (
        "import torch\n"
        "from supsup import kernels\n"
        "from supsup.kernels import triton_kernels as tk\n"
        "tk.TOPK_BLOCK = 1024\n"
        "g = torch.Generator().manual_seed(3)\n"
        "sizes = [1, 7, 5000, 9000, 300, 64]\n"
        "flat = torch.randn(sum(sizes), generator=g)\n"
        "flat[5008:7008] = 0.25 * torch.sign(flat[5008:7008])\n"
        "flat[14008:14108] = 0.0\n"
        "flat[14108:14158] = -0.0\n"
        "rows = [r.reshape(1, -1) for r in flat.split(sizes)] + [torch.randn(3, 2000, generator=g)]\n"
        "keeps = [1, 3, 1000, 8999, 0, 64, 17]\n"
        "want = kernels._torch_topk_cutoffs(rows, keeps)\n"
        "with kernels.use_backend('triton'):\n"
        "    got = kernels.topk_cutoffs(rows, keeps)\n"
        "assert torch.equal(got, want), (got, want)\n"
    )
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_failed_native_build_is_a_warning_with_its_reason_and_the_backend_says_so(tmp_path):
    """Without a working C compiler the torch path serves, with a warning that says why (a subprocess: the
    library is built once per process)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "SUPSUP_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "from supsup import kernels; print(kernels.describe('cpu'))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning: supsup: the native CPU kernels could not be built" in done.stderr
    assert "no-such-compiler" in done.stderr
    assert "'backend': 'torch'" in done.stdout and "native kernels unavailable" in done.stdout
