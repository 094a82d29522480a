"""Bring your own network: every supported layer type learns tasks, freezes them, round-trips through
``state_dict()`` and answers every route identically; conversion reports what it did, refuses what it does not
know, and leaves nothing trainable but scores and the chosen per-task vectors; masks over kept weights."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from supsup import Superposition, SupermaskModel, convert_to_supermask
from supsup.checkpoint import CheckpointError, load_into, save_checkpoint
from supsup.layers import SupermaskConvNd


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


class Tokens(nn.Module):
    """[B, T, d] tokens through a Linear and a LayerNorm, mean over T, then a head."""

    def __init__(self):
        super().__init__()
        self.body, self.norm, self.head = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.norm(F.relu(self.body(x))).mean(1))


class Encoder(nn.Module):
    """Token ids [B, T] -> embedding -> a 1-layer TransformerEncoder -> mean over unpadded tokens -> head.
    ``padding`` (a keyword argument): key padding mask [B, T], True where a token is padding."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, padding=None):
        h = self.embed(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding)
        if not self.batch_first:
            h = h.transpose(0, 1)
        keep = torch.ones(ids.shape, dtype=h.dtype) if padding is None else (~padding).to(h.dtype)
        return self.head((h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True))


def _convs(dims):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    return nn.Sequential(conv(2, 4, 3, padding="same", padding_mode="reflect", dilation=2), bn(4), nn.ReLU(),
                         conv(4, 4, 3, stride=2, padding=1, padding_mode="circular", groups=2), nn.GroupNorm(2, 4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 ** dims, 3))


# name -> (network factory, input factory(n, seed), extra forward kwargs factory(n) or None)
CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
               lambda n, s: torch.randn(n, 6, generator=torch.Generator().manual_seed(s)), None),
    "linear-tokens": (Tokens, lambda n, s: torch.randn(n, 5, 6, generator=torch.Generator().manual_seed(s)), None),
    "conv1d": (lambda: _convs(1), lambda n, s: torch.randn(n, 2, 6, generator=torch.Generator().manual_seed(s)), None),
    "conv2d": (lambda: _convs(2), lambda n, s: torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(s)),
               None),
    "conv3d": (lambda: _convs(3), lambda n, s: torch.randn(n, 2, 6, 6, 6, generator=torch.Generator().manual_seed(s)),
               None),
    "embedding": (lambda: nn.Sequential(nn.Embedding(11, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3)),
                  lambda n, s: torch.randint(0, 11, (n, 5), generator=torch.Generator().manual_seed(s)), None),
    "transformer": (Encoder, lambda n, s: torch.randint(1, 11, (n, 5), generator=torch.Generator().manual_seed(s)),
                    lambda n: {"padding": torch.arange(5).expand(n, 5) >= 5 - torch.arange(n).remainder(3).view(-1, 1)}),
}
POLICIES = {"bias": "per-task", "norm_affine": "per-task"}


def make(case: str, **policies) -> SupermaskModel:
    torch.manual_seed(7)  # the same dense module every time (its weights matter with weights="keep")
    return SupermaskModel(CASES[case][0](), seed=3, **{**POLICIES, **policies})


def data(case: str, n: int, seed: int):
    x = CASES[case][1](n, seed)
    kwargs = CASES[case][2](n) if CASES[case][2] else {}
    return x, kwargs


def learn_task(model: SupermaskModel, case: str, task: int, steps: int = 6) -> list[float]:
    model.begin_tasks(1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.05)
    model.train()
    x, kw = data(case, 12, seed=task)
    y = (torch.arange(12) + task) % 3
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x, task, **kw), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.end_tasks()
    return losses


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_type_learns_freezes_round_trips_and_answers_every_route(case, monkeypatch, tmp_path):
    model = make(case)
    only = {n for n, p in model.named_parameters() if p.requires_grad}
    assert only == set()  # before begin_tasks nothing at all is trainable

    losses = learn_task(model, case, 0)
    assert losses[-1] < losses[0]
    x, kw = data(case, 6, seed=99)
    model.eval()
    y0 = model(x, 0, **kw).detach()
    model.train()
    y0_train = model(x, 0, **kw).detach()
    learn_task(model, case, 1)
    model.train()
    assert torch.equal(model(x, 0, **kw), y0_train)  # task 0 frozen while task 1 trained, train mode too
    model.eval()
    assert torch.equal(model(x, 0, **kw), y0)
    y1 = model(x, 1, **kw).detach()
    assert not torch.allclose(y0, y1)

    # every route gives each sample its own task's output
    x2 = torch.cat([x, x])
    kw2 = {k: torch.cat([v, v]) for k, v in kw.items()}
    assert torch.allclose(model(x2, [0, 1], **kw2), torch.cat([y0, y1]), atol=1e-5)
    ids = torch.arange(6) % 2
    expected = torch.where(ids.view(-1, 1) == 0, y0, y1)
    assert torch.allclose(model(x, ids, **kw), expected, atol=1e-5)
    assert torch.allclose(model(x, Superposition(torch.tensor([0.0, 1.0])), **kw), y1, atol=1e-5)
    one_hot = F.one_hot(ids, 2).float()
    assert torch.allclose(model(x, Superposition(one_hot), **kw), expected, atol=1e-5)

    def entropy_gradient():  # task inference: ∂H/∂α at α = 1/2 per sample
        alpha = torch.tensor([[0.5, 0.5], [0.3, 0.7]]).repeat(3, 1).requires_grad_(True)
        logits = model(x, Superposition(alpha), **kw)
        (-(logits.softmax(-1) * logits.log_softmax(-1)).sum()).backward()
        return alpha.grad

    direct = entropy_gradient()
    assert direct.abs().sum() > 0
    with monkeypatch.context() as patch:  # the per-sample path for large layers: one task's masks at a time
        patch.setattr("supsup.layers.PER_SAMPLE_WEIGHT_BUDGET", 0)
        assert torch.allclose(model(x, Superposition(one_hot), **kw), expected, atol=1e-5)
        assert torch.allclose(entropy_gradient(), direct, atol=1e-4)

    # K stacked tasks in training equal the same tasks one at a time
    model.begin_tasks(2)
    model.eval()
    stacked = model(x2, [2, 3], **kw2)
    assert torch.allclose(stacked, torch.cat([model(x, 2, **kw), model(x, 3, **kw)]), atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scores") or n.endswith(".trained") for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    model.end_tasks()

    fresh = make(case)
    fresh.load_state_dict(through_torch_save(model.state_dict()))
    fresh.eval()
    from_file = load_into(make(case), save_checkpoint(model, tmp_path / "model.safetensors")).eval()
    for t in range(4):
        assert torch.equal(fresh(x, t, **kw), model(x, t, **kw))
        assert torch.equal(from_file(x, t, **kw), model(x, t, **kw))


def test_per_task_biases_and_affines_never_leak_between_tasks():
    model = make("conv2d")
    learn_task(model, "conv2d", 0)
    rows = {id(t): t.learned[0].clone() for t in model.per_task_tensors()}
    assert len(rows) == 7  # the biases of two convs and the head, BatchNorm's and GroupNorm's weight and bias
    learn_task(model, "conv2d", 1)
    for t in model.per_task_tensors():
        assert torch.equal(t.learned[0], rows[id(t)])
    assert any(not torch.equal(t.learned[0], t.learned[1]) for t in model.per_task_tensors())
    # the per-task floats are counted: masks + 4 bytes per float
    floats = sum(t.numel for t in model.per_task_tensors()) + 2 * 4  # + the BatchNorm's mean and var
    assert model.bytes_per_task() == model.mask_bytes_per_task() + 4 * floats


def test_strict_mode_names_each_unknown_trainable_module():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.gain

    def net():
        return nn.Sequential(nn.Linear(4, 4), nn.PReLU(), Scale(), nn.Linear(4, 2))

    refused = net()
    before = copy.deepcopy(refused.state_dict())
    with pytest.raises(ValueError, match=r"(?s)1 \(PReLU, 1 trainable.*2 \(Scale, 4 trainable.*leave="):
        convert_to_supermask(refused, seed=0)
    assert isinstance(refused[0], nn.Linear) and refused[0].weight.requires_grad  # found before anything changed
    assert all(torch.equal(v, refused.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"0 \(MultiheadAttention: .*add_bias_kv"):
        convert_to_supermask(nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True)), seed=0)
    converted, report = convert_to_supermask(net(), seed=0, leave=[nn.PReLU, "2"])
    assert [r.action for r in report] == ["converted", "frozen", "frozen", "converted"]
    assert not any(p.requires_grad for p in converted.parameters())
    _, report = convert_to_supermask(net(), seed=0, strict=False)
    assert report.row("2").action == "frozen" and "strict=False" in report.row("2").notes


def test_report_says_what_became_of_every_bias_and_affine():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    _, report = convert_to_supermask(net, seed=0)
    assert report.row("0").notes == "bias dropped" and report.row("4").notes == "bias dropped"
    assert report.row("1").action == "per-task" and "affine dropped" in report.row("1").notes
    assert report.row("2").action == "left alone"
    table = report.table()
    assert all(len(line) <= 80 for line in table.splitlines()) and "bias dropped" in table
    model = SupermaskModel(nn.Sequential(nn.Linear(3, 2)), seed=0, bias="frozen")
    assert "bias frozen, seeded" in repr(model)


def test_a_bare_layer_is_converted():
    layer, report = convert_to_supermask(nn.Linear(3, 2), seed=0)
    assert type(layer).__name__ == "SupermaskLinear" and report.row("").action == "converted"
    model = SupermaskModel(nn.Conv2d(1, 2, 3, padding="same"), seed=0)
    model.begin_tasks(1)
    assert model(torch.randn(2, 1, 5, 5), 0).shape == (2, 2, 5, 5)


def test_kept_weights_with_an_all_ones_mask_reproduce_the_pretrained_network():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same", padding_mode="replicate"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 25, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 2, 5, 5)
    expected = dense(x)
    model = SupermaskModel(copy.deepcopy(dense), seed=0, weights="keep", bias="frozen", rule="topk", density=1.0)
    model.begin_tasks(1)
    model.eval()
    assert torch.allclose(model(x, 0), expected, atol=1e-6)
    model.end_tasks()
    assert torch.allclose(model(x, 0), expected, atol=1e-6)
    per_task = SupermaskModel(copy.deepcopy(dense), seed=0, weights="keep", bias="per-task", norm_affine="per-task",
                              rule="topk", density=1.0)
    per_task.begin_tasks(1)  # per-task vectors start from the kept ones
    assert torch.allclose(per_task.eval()(x, 0), expected, atol=1e-6)
    threshold = SupermaskModel(copy.deepcopy(dense), seed=0, weights="keep", bias="frozen")
    threshold.begin_tasks(1)  # over kept weights, threshold scores start positive: the pretrained network
    assert torch.allclose(threshold.eval()(x, 0), expected, atol=1e-6)
    seeded = SupermaskModel(copy.deepcopy(dense), seed=0, bias="frozen")
    seeded.begin_tasks(1)
    assert 0.3 < float(torch.cat([(s >= 0).flatten() for s in seeded.score_parameters()]).float().mean()) < 0.7


def test_kept_weights_are_fingerprinted_and_a_mismatch_names_the_layer(tmp_path):
    def model(seed):
        torch.manual_seed(seed)
        return SupermaskModel(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), seed=0, weights="keep",
                              bias="frozen")

    trained = model(1)
    trained.begin_tasks(1)
    trained.end_tasks()
    state = through_torch_save(trained.state_dict())
    assert "net.0.base_sha256" in state and "net.0.weight" not in state
    model(1).load_state_dict(state)  # the same weights: fine
    with pytest.raises(RuntimeError, match=r"net\.0: its masks were learned over other base weights"):
        model(2).load_state_dict(state)

    path = save_checkpoint(trained, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match=r"layer 0 \(net\.0\).*kept base weights differ"):
        load_into(model(2), path)
    path = save_checkpoint(trained, tmp_path / "with-weights.safetensors", base_weights=True)
    other = load_into(model(2), path)  # the stored weights replace the model's, then the masks load
    x = torch.randn(3, 4)
    assert torch.equal(other.eval()(x, 0), trained.eval()(x, 0))


@settings(max_examples=25, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), kernel=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.sampled_from([0, 1, 2, "same", "valid"]), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), seed=st.integers(0, 1000))
def test_supermask_convolutions_match_torch_with_the_masked_weight(dims, kernel, stride, padding, dilation, groups,
                                                                   mode, seed):
    if padding == "same":
        stride = 1
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 4, kernel, stride, padding, dilation, groups,
                                                             padding_mode=mode)
    x = torch.randn(3, 2, *[6] * dims)
    layer, _ = convert_to_supermask(copy.deepcopy(conv), seed=seed, weights="keep", bias="frozen")
    assert isinstance(layer, SupermaskConvNd)
    layer.begin_tasks([0])
    mask = layer.scores[0] >= 0
    layer.route = 0
    with torch.no_grad():
        conv.weight.mul_(mask)
        assert torch.allclose(layer(x), conv(x), atol=1e-5)
        layer.begin_tasks([0, 1])
        layer.route = [0, 1]
        masked = [layer.weight * (s >= 0) for s in layer.scores]
        stacked = layer(torch.cat([x, x]))
        for j, w in enumerate(masked):
            conv.weight.copy_(w)
            assert torch.allclose(stacked[3 * j:3 * (j + 1)], conv(x), atol=1e-5)


def test_a_transformer_that_is_not_batch_first_works_with_a_task_id():
    model = SupermaskModel(Encoder(batch_first=False), seed=0, bias="frozen")
    learn_task(model, "transformer", 0, steps=2)
    x, kw = data("transformer", 4, 5)
    assert model.eval()(x, 0, **kw).shape == (4, 3)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "bool-attn", "float-attn", "causal", "both"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_supermask_attention_over_kept_weights_matches_torch(batch_first, masks, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    attention, _ = convert_to_supermask(copy.deepcopy(mha), seed=0, weights="keep", bias="frozen", rule="topk",
                                        density=1.0)
    attention.in_proj.begin_tasks([0])
    attention.out_proj.begin_tasks([0])
    attention.in_proj.route = attention.out_proj.route = 0
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = padding[2, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kwargs = {"none": {}, "padding": {"key_padding_mask": padding},
              "bool-attn": {"attn_mask": torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.3},
              "float-attn": {"attn_mask": torch.randn(5, 5)},
              "causal": {"attn_mask": causal, "is_causal": True},
              "both": {"attn_mask": causal.isinf(), "key_padding_mask": padding}}[masks]
    if masks == "bool-attn":
        kwargs["attn_mask"].fill_diagonal_(False)  # every query attends to something
    expected, expected_weights = mha(x, x, x, need_weights=need_weights, **kwargs)
    with torch.no_grad():
        out, weights = attention(x, x, x, need_weights=need_weights, **kwargs)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (weights is None) == (expected_weights is None)
    if need_weights:
        assert torch.allclose(weights, expected_weights, atol=1e-5)
