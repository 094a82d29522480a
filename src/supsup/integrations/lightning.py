"""SupSup in PyTorch Lightning: one task per ``Trainer.fit``.

``SupSupCallback`` begins a new task when a fit is set up, before Lightning calls
``configure_optimizers`` (so the optimiser can be built over the new task's scores, a Parameter that
``begin_tasks`` creates), checks that the optimiser trains those scores, and freezes the task when the
fit ends. Lightning checkpoints hold the LightningModule's ``state_dict``, so they hold every learned
mask and the scores of the task in training: ``load_from_checkpoint`` restores every task, and
``fit(ckpt_path=...)`` resumes an interrupted task. ``SupSupModule`` is a small LightningModule that
trains a ``SupermaskModel`` this way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package has the same API
    try:
        import pytorch_lightning as pl
    except ImportError as err:  # pragma: no cover - exercised only where neither is installed
        from supsup.integrations import missing_extra

        raise missing_extra("lightning", "lightning", err) from err

from supsup.learners import TrainConfig, make_optimizer
from supsup.model import SupermaskModel


def find_supermask_model(module: torch.nn.Module) -> SupermaskModel:
    """The one ``SupermaskModel`` among ``module``'s modules."""
    found = [m for m in module.modules() if isinstance(m, SupermaskModel)]
    if len(found) != 1:
        raise ValueError(f"SupSupCallback needs exactly one SupermaskModel in the LightningModule, "
                         f"found {len(found)}")
    return found[0]


class SupSupCallback(pl.Callback):
    """Begins a task in ``setup`` of every fit and freezes it (``end_tasks``) when the fit ends.

    Build the optimiser in ``configure_optimizers`` from ``model.trainable_parameters()`` (or from
    ``self.parameters()``, which then holds the new scores): Lightning calls it after ``setup``. A fit
    that stops with an exception leaves its task in training, scores included, so that its last
    checkpoint can resume it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            find_supermask_model(pl_module).begin_tasks(1)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """``fit(ckpt_path=...)``: the restored model must hold the task to go on training."""
        model = find_supermask_model(pl_module)
        if trainer.state.fn == "fit" and not model.training_tasks:
            raise RuntimeError(f"the checkpoint holds {model.num_tasks} learned tasks and no task in training "
                               f"(it was saved after its fit ended): to learn a new task, load it with "
                               f"load_from_checkpoint or load_state_dict and call fit without ckpt_path")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After every restore: the optimiser must train the scores of the task in training."""
        model = find_supermask_model(pl_module)
        optimised = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if not all(id(p) in optimised for p in model.trainable_parameters()):
            raise RuntimeError(f"the optimiser does not train the scores of task {model.training_tasks}: build it "
                               f"in configure_optimizers from model.trainable_parameters() (SupSupCallback begins "
                               f"the task before Lightning calls configure_optimizers)")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        find_supermask_model(pl_module).end_tasks()


class SupSupModule(pl.LightningModule):
    """Trains a ``SupermaskModel``, one task per ``Trainer.fit``, on batches ``(x, y)``: cross-entropy
    over all outputs, the optimiser of ``supsup.learners.make_optimizer`` over the task's scores
    (``optimizer``: rmsprop, adam or sgd; ``fused_step=False`` for torch's RMSprop, e.g. to clip the scores'
    gradients, which the fused step leaves as dL/d(W ⊙ M)). ``forward(x, task)`` is the model's. Logs ``train_loss``
    and, for validation batches, ``val_accuracy``."""

    def __init__(self, model: SupermaskModel, *, optimizer: str = "rmsprop", lr: float = 1e-4,
                 weight_decay: float = 0.0, momentum: float = 0.9, fused_step: bool = True):
        super().__init__()
        self.model = model
        self.train_config = TrainConfig(optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                        fused_step=fused_step)
        self.save_hyperparameters(ignore=["model"])

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        return self.model(x, task)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [SupSupCallback()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.train_config)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x, self.model.training_tasks[0]), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """``val_accuracy`` of the task in training (outside a fit, of the last learned task)."""
        x, y = batch
        task = self.model.training_tasks[0] if self.model.training_tasks else self.model.num_tasks - 1
        classes = self.model.num_classes or self.model.output_size
        predicted = self.model(x, task)[:, :classes].argmax(-1)
        self.log("val_accuracy", (predicted == y).float().mean())
