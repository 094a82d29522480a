"""Learning on real MNIST, scaled down: accuracy floors and task inference on trained masks."""

import copy

import pytest

from supsup import Inference, build_model
from supsup.data.streams import PermutedMNIST
from supsup.evaluation import evaluate
from supsup.learners import TrainConfig, make_optimizer, train_task_group


@pytest.fixture(scope="module")
def trained(mnist):
    stream = PermutedMNIST(mnist, 3, seed=1)
    model = build_model("lenet", output_size=50, seed=1)
    cfg = TrainConfig(batches_per_task=150)
    for _ in range(3):
        train_task_group(model, stream, cfg)
    return model, stream


def test_each_task_learns_far_above_chance_and_is_not_forgotten(trained):
    model, stream = trained
    results = evaluate(model, stream, "GG").tasks
    assert all(r.accuracy > 0.85 for r in results)
    # masks are frozen: a fourth task leaves the first three exactly as they were
    extended = copy.deepcopy(model)
    stream4 = PermutedMNIST(stream.data, 4, seed=1)
    train_task_group(extended, stream4, TrainConfig(batches_per_task=5))
    assert extended.num_tasks == 4
    assert [r.accuracy for r in evaluate(extended, stream4, "GG", tasks=[0, 1, 2]).tasks] == [r.accuracy for r in results]


@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_one_shot_infers_the_task_from_one_image(trained, objective):
    model, stream = trained
    hits = total = 0
    for t in range(3):
        x, _ = stream.test_set(t)
        for i in range(0, 400, 4):
            hits += int(infer_one(model, x[i : i + 1], objective)) == t
            total += 1
    assert hits / total >= 0.97


def infer_one(model, x, objective):
    from supsup.inference import infer_tasks

    return infer_tasks(model, x, Inference(objective=objective))


def test_only_the_current_tasks_scores_are_optimised(trained):
    model = copy.deepcopy(trained[0])
    model.begin_tasks(1)
    opt = make_optimizer(model.score_parameters(), TrainConfig())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_weights()
    model.end_tasks()


def test_mixed_stream_per_sample_inference_routes_each_sample(trained):
    from supsup.evaluation import evaluate_mixed

    model, stream = trained
    mixed = evaluate_mixed(model, stream, Inference(granularity="sample"), per_task=200, seed=3)
    assert mixed.samples == 600
    assert mixed.task_inference_accuracy >= 0.95
    assert mixed.accuracy_given - 0.03 <= mixed.accuracy_inferred <= mixed.accuracy_given
    with pytest.raises(ValueError, match="per-sample"):
        evaluate_mixed(model, stream, Inference(granularity="image"))


def test_per_sample_figures_do_not_depend_on_how_many_samples_are_inferred_together(trained, monkeypatch):
    from supsup import evaluation

    model, stream = trained
    how = Inference(granularity="sample")

    def figures():
        return (evaluation.evaluate_task(model, stream, 1, "GNu", how).as_dict(),
                evaluation.evaluate_mixed(model, stream, how, per_task=400, seed=3).as_dict())

    together = figures()  # LeNet on flat images: SAMPLE_BATCH (1,024) samples per pass
    monkeypatch.setattr(evaluation, "SAMPLE_BATCH", 1)  # the evaluation's batches of 128
    assert figures() == together


def test_classes_with_inferred_tasks_reuse_the_given_tasks_predictions_only_where_the_tasks_agree(trained):
    import torch

    from supsup.evaluation import _classified_with, predict

    model, stream = trained
    x, y = stream.test_set(2)
    x, y = x[:300], y[:300]
    tasks = torch.full((300,), 2)
    tasks[::3] = torch.arange(100) % 3  # a third inferred as tasks 0, 1, 2
    correct_given = predict(model, x, 2) == y
    got = _classified_with(model, x, y, tasks, correct_given, tasks != 2)
    assert torch.equal(got, predict(model, x, tasks) == y)
    assert not torch.equal(got, correct_given)  # the other tasks' rows were classified again


def test_training_step_without_a_graph_is_the_plain_step():
    import torch
    import torch.nn.functional as F

    from supsup.learners import TrainingStep

    def make():
        model = build_model("lenet", output_size=10, seed=3)
        model.begin_tasks(1)
        return model, make_optimizer(model.score_parameters(), TrainConfig(optimizer="adam", lr=1e-2))

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(4)]
    stepped, opt_a = make()
    step = TrainingStep(lambda x, y: F.cross_entropy(stepped(x, 0), y), opt_a, cuda_graph=False)
    plain, opt_b = make()
    for x, y in batches:
        loss = step(x, y)
        want = F.cross_entropy(plain(x, 0), y)
        opt_b.zero_grad()
        want.backward()
        opt_b.step()
        assert torch.equal(loss, want.detach())
    assert all(torch.equal(a, b) for a, b in zip(stepped.score_parameters(), plain.score_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(stepped.score_parameters(), make()[0].score_parameters()))


def test_cuda_graph_is_refused_for_sgd_and_off_cuda():
    import torch

    from supsup.learners import TrainingStep

    model = build_model("lenet", output_size=10, seed=3)
    model.begin_tasks(1)
    with pytest.raises(ValueError, match="SGD"):
        make_optimizer(model.score_parameters(), TrainConfig(optimizer="sgd"), capturable=True)
    step = TrainingStep(lambda x, y: model(x, 0).sum(), torch.optim.Adam(model.score_parameters()), cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        step(torch.randn(2, 784), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_cuda_graphed_gg_step_trains_like_the_eager_step():
    """Reduced ResNet-18, top-k masks (batched Triton selection), per-task BN, Adam + cosine schedule with a
    tensor lr: the graphed step gives the same losses, scores, masks and BN statistics as the eager step."""
    import torch
    import torch.nn.functional as F

    from supsup.density import er_density
    from supsup.learners import TrainingStep

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, generator=gen).cuda(), torch.randint(0, 5, (32,), generator=gen).cuda())
               for _ in range(8)]
    cfg = TrainConfig(optimizer="adam", lr=1e-2, weight_decay=1e-4)
    runs = []
    for graphed in (False, True):
        model = build_model("gem_resnet18", output_size=5, num_classes=5, seed=0, rule="topk",
                            density=er_density(8)).cuda()
        model.begin_tasks(1)
        model.train()
        opt = make_optimizer(model.score_parameters(), cfg, capturable=True)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(batches))
        step = TrainingStep(lambda x, y, m=model: F.cross_entropy(m(x, 0), y), opt, cuda_graph=graphed, warmup=2)
        losses = []
        for x, y in batches:
            losses.append(float(step(x, y)))
            schedule.step()
        runs.append((losses, [p.detach().clone() for p in model.score_parameters()],
                     [bn.running_mean.clone() for bn in model.norm_layers()]))
        if graphed:
            assert step.graph is not None
        model.end_tasks()
        runs[-1] += ([layer.bank.packed.clone() for layer in model.mask_layers()],)
    (la, sa, ba, ma), (lb, sb, bb, mb) = runs
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(sa, sb))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ba, bb))
    assert all(torch.equal(a, b) for a, b in zip(ma, mb))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_batched_top_k_on_the_gpu_equals_kthvalue_on_resnet50_layers():
    import torch

    from supsup import kernels
    from supsup.density import er_density
    from supsup.masks import topk_keep_many

    model = build_model("resnet50", output_size=10, num_classes=10, seed=0, rule="topk", density=er_density(8))
    gen = torch.Generator().manual_seed(1)
    scores = [torch.randn(2, *layer.weight.shape, generator=gen).cuda() for layer in model.mask_layers()]
    densities = [layer.density for layer in model.mask_layers()]
    assert kernels.backend_for(scores[0].device) == "triton"
    got = topk_keep_many(scores, densities)
    with kernels.use_backend("torch"):
        want = topk_keep_many(scores, densities)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
