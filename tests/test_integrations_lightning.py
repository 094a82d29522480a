"""SupSup in PyTorch Lightning: one task per ``Trainer.fit``, every task through Lightning checkpoints."""

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optional import import_or_skip

pl = import_or_skip("lightning.pytorch", "lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from supsup import Inference, build_model, infer_tasks  # noqa: E402
from supsup.data.streams import PermutedMNIST  # noqa: E402
from supsup.integrations.lightning import SupSupCallback, SupSupModule  # noqa: E402
from supsup.learners import TrainConfig, train_task_group  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BATCHES = 100


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)  # no "GPU available" banners
    yield
    logger.setLevel(level)


def trainer(epochs: int = 1, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def lenet(seed: int = 1):
    return build_model("lenet", output_size=100, seed=seed)


def masks(model) -> list[torch.Tensor]:
    return [layer.bank.packed for layer in model.mask_layers()]


def runner_batches(stream, task: int) -> DataLoader:
    """The batches our runner draws for ``task``, in its order."""
    pairs = list(stream.train_batches(task, 128, BATCHES))
    return DataLoader(TensorDataset(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])),
                      batch_size=128)


def test_two_tasks_trained_checkpointed_and_restored_into_a_fresh_model(mnist, tmp_path):
    stream = PermutedMNIST(mnist, 2, seed=1)
    module = SupSupModule(lenet())
    for task in range(2):
        fitted = trainer(1)
        held_out = DataLoader(TensorDataset(*stream.batch(task, "test", torch.arange(1000, 1500))), batch_size=250)
        fitted.fit(module, runner_batches(stream, task), val_dataloaders=held_out)
        assert module.model.num_tasks == task + 1 and not module.model.training_tasks
        assert fitted.callback_metrics["val_accuracy"] > 0.75  # 500 held-out samples, SupSupModule logs it
    # the runner's batches, scores and optimiser: bit-identical masks
    reference = lenet()
    for _ in range(2):
        train_task_group(reference, stream, TrainConfig(batches_per_task=BATCHES))
    assert all(torch.equal(a, b) for a, b in zip(masks(module.model), masks(reference)))

    path = tmp_path / "supsup.ckpt"
    fitted.save_checkpoint(path, weights_only=True)  # the state_dict: every mask
    restored = SupSupModule.load_from_checkpoint(path, model=lenet(), weights_only=True)
    assert restored.model.num_tasks == 2
    (validated,) = trainer().validate(restored, held_out, verbose=False)  # outside a fit: the last task
    assert validated["val_accuracy"] == fitted.callback_metrics["val_accuracy"].item()
    module.eval(), restored.eval()
    for task in range(2):
        x, y = stream.batch(task, "test", torch.arange(1000))
        assert torch.equal(restored(x, task), module(x, task))  # identical predictions, task given
        assert (restored(x, task)[:, :10].argmax(-1) == y).float().mean() > 0.8
        inferred = infer_tasks(restored.model, x, Inference(granularity="sample"))
        assert torch.equal(inferred, infer_tasks(module.model, x, Inference(granularity="sample")))
        assert torch.equal(restored(x, inferred), module(x, inferred))  # and task inferred


def test_an_interrupted_fit_resumes_from_its_checkpoint_to_the_same_masks(tmp_path):
    """A checkpoint saved during a fit holds the task's scores and optimiser state: ``fit(ckpt_path=...)``
    in a fresh process goes on to the masks of an uninterrupted fit."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(640, 784, generator=g), torch.randint(0, 10, (640,), generator=g))
    full = SupSupModule(lenet(3))
    trainer(1).fit(full, DataLoader(data, batch_size=64))  # task 0
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(2, enable_checkpointing=True, callbacks=[every_epoch]).fit(full, DataLoader(data, batch_size=64))
    resumed = SupSupModule(lenet(3))
    trainer(2).fit(resumed, DataLoader(data, batch_size=64), ckpt_path=tmp_path / "epoch=0-step=10.ckpt")
    assert resumed.model.num_tasks == 2
    assert all(torch.equal(a, b) for a, b in zip(masks(resumed.model), masks(full.model)))


def test_resuming_a_finished_fit_is_refused_with_what_to_do(tmp_path):
    module = SupSupModule(lenet())
    data = DataLoader(TensorDataset(torch.randn(64, 784), torch.randint(0, 10, (64,))), batch_size=64)
    done = trainer(1)
    done.fit(module, data)
    done.save_checkpoint(tmp_path / "done.ckpt")
    with pytest.raises(RuntimeError, match="no task in training .* call fit without ckpt_path"):
        trainer(2).fit(SupSupModule(lenet()), data, ckpt_path=tmp_path / "done.ckpt")


class UsersModule(pl.LightningModule):
    """A user's own LightningModule: a SupermaskModel plus a head of ordinary weights."""

    def __init__(self, optimise_scores: bool = True):
        super().__init__()
        self.body, self.head = lenet(), nn.Linear(100, 10)
        self.optimise_scores = optimise_scores

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.body(x, self.body.training_tasks[0])), y)

    def configure_optimizers(self):
        params = self.parameters() if self.optimise_scores else self.head.parameters()
        return torch.optim.Adam(params, lr=1e-3)


def test_the_callback_begins_and_ends_a_task_around_each_fit_of_a_users_module():
    module = UsersModule()
    data = DataLoader(TensorDataset(torch.randn(128, 784), torch.randint(0, 10, (128,))), batch_size=64)
    for task in range(2):
        trainer(1, callbacks=[SupSupCallback()]).fit(module, data)
        assert module.body.num_tasks == task + 1 and not module.body.training_tasks


def test_an_optimiser_without_the_tasks_scores_is_refused():
    data = DataLoader(TensorDataset(torch.randn(64, 784), torch.randint(0, 10, (64,))), batch_size=64)
    with pytest.raises(RuntimeError, match=r"the optimiser does not train the scores of task \[0\]"):
        trainer(1, callbacks=[SupSupCallback()]).fit(UsersModule(optimise_scores=False), data)


@pytest.mark.parametrize("fused_step", [True, False])
def test_the_module_fits_with_the_fused_step_or_torchs_rmsprop(fused_step):
    from supsup.fused import ThresholdRMSprop
    from supsup.kernels import native

    module = SupSupModule(lenet(), fused_step=fused_step)
    data = DataLoader(TensorDataset(torch.randn(64, 784), torch.randint(0, 10, (64,))), batch_size=32)
    fitted = trainer(1)
    fitted.fit(module, data)
    assert isinstance(fitted.optimizers[0], ThresholdRMSprop) == (fused_step and native.available())
    assert module.model.num_tasks == 1


def test_the_callback_needs_exactly_one_supermask_model():
    class Two(UsersModule):
        def __init__(self):
            super().__init__()
            self.other = lenet()

    data = DataLoader(TensorDataset(torch.randn(64, 784), torch.randint(0, 10, (64,))), batch_size=64)
    with pytest.raises(ValueError, match="exactly one SupermaskModel in the LightningModule, found 2"):
        trainer(1, callbacks=[SupSupCallback()]).fit(Two(), data)


def test_the_example_runs(tmp_path, data_root, capsys):
    from supsup.examples.lightning_permuted_mnist import main

    assert main(["--tasks", "2", "--batches", "20", "--test-samples", "500", "--data-root", str(data_root),
                 "--out", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [row[-1] for row in rows] == ["yes", "yes"] and (tmp_path / "supsup.ckpt").exists()
