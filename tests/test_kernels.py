"""Superposition from packed bits equals the float reference: kernel by kernel (every backend this
machine has, the Triton kernel on a GPU), and through the layers' autograd (values, α-gradients and
input gradients; shared and per-sample α; Linear and Conv2d)."""

import os

import pytest
import torch

from supsup import kernels
from supsup import layers as layers_module
from supsup.layers import SupermaskConv2d, SupermaskLinear, Superposition
from supsup.masks import pack_bits


def cpu_backends():
    names = ["torch"]
    if kernels.native.available():
        names.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton_available():
        names.append("triton")  # Triton's interpreter runs the GPU kernel on the CPU
    return names


CASES = [(1, 8), (3, 91), (40, 1000), (70, 4099), (5, 8 * 300 + 3)]  # (k, P): odd sizes and tails


def reference(masks, g, alpha):
    stack = masks.float()
    return g @ stack.T, alpha @ stack


def check_backend(name, device):
    gen = torch.Generator().manual_seed(0)
    for k, p in CASES:
        masks = torch.rand(k, p, generator=gen) < 0.5
        packed = pack_bits(masks).to(device)
        g, alpha = torch.randn(3, p, generator=gen), torch.randn(2, k, generator=gen)
        want_c, want_s = reference(masks, g, alpha)
        with kernels.use_backend(name):
            got_c = kernels.contract(packed, g.to(device)).cpu()
            got_c1 = kernels.contract(packed, g[0].to(device)).cpu()
            got_s = kernels.superpose(packed, alpha.to(device), p).cpu()
            got_s1 = kernels.superpose(packed, alpha[1].to(device), p).cpu()
            unpacked = kernels.unpack(packed, p, g[0].to(device)).cpu()
        tol = dict(rtol=1e-5, atol=1e-4)
        assert torch.allclose(got_c, want_c, **tol), (name, k, p, (got_c - want_c).abs().max())
        assert torch.allclose(got_c1, want_c[0], **tol)
        assert torch.allclose(got_s, want_s, **tol), (name, k, p, (got_s - want_s).abs().max())
        assert torch.allclose(got_s1, want_s[1], **tol)
        assert torch.equal(unpacked, masks.float() * g[0])


@pytest.mark.parametrize("name", cpu_backends())
def test_kernels_equal_the_float_reference_on_random_masks(name):
    check_backend(name, torch.device("cpu"))


@pytest.mark.parametrize("name", cpu_backends())
def test_contraction_skips_zero_stretches_of_the_gradient_exactly(name):
    """Rows of dead ReLUs make whole stretches of ∂L/∂W_eff ⊙ W zero; skipping them changes nothing."""
    gen = torch.Generator().manual_seed(4)
    masks = torch.rand(40, 300, 50, generator=gen) < 0.5  # [k, out, in]: 300 rows of 50 weights
    g = torch.randn(300, 50, generator=gen) * (torch.rand(300, 1, generator=gen) < 0.3)  # 70% of rows zero
    g[:, :7] = 0
    with kernels.use_backend(name):
        got = kernels.contract(pack_bits(masks.reshape(40, -1)), g.reshape(-1))
    assert torch.allclose(got, masks.reshape(40, -1).float() @ g.reshape(-1), rtol=1e-5, atol=1e-4)


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
        "    v = torch.randn(2, p, generator=g); v[:, 64:640] = 0\n"
        "    a = torch.randn(2, k, generator=g)\n"
        "    assert torch.allclose(native.contract(pack_bits(m), v), v @ m.float().T, rtol=1e-5, atol=1e-4)\n"
        "    assert torch.allclose(native.superpose(pack_bits(m), a, p), a @ m.float(), rtol=1e-5, atol=1e-4)\n"
        "    assert torch.equal(native.unpack(pack_bits(m), p, v[0]), m.float() * v[0])\n"
    )
    import subprocess
    import sys

    env = {**os.environ, "SUPSUP_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_gpu_kernels_equal_the_float_reference_on_random_masks(name):
    if name == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed")
    check_backend(name, torch.device("cuda"))


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
