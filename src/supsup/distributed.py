"""supsup on ``torch.distributed``: task-parallel rounds, data-parallel task groups, sharded mask banks.

Processes ("ranks") are started by ``torchrun`` (``torchrun --nproc-per-node N -m supsup run PRESET ...``)
or anything else that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (e.g. ``srun``);
``init`` joins them: NCCL with one GPU per rank (``cuda:LOCAL_RANK``), gloo on the CPU. Every collective
gives up after ``SUPSUP_DIST_TIMEOUT`` seconds (default 1800); a rank whose peer died gets a
``DistributedError`` at its next collective (gloo notices a closed connection at once).

- **Task parallelism.** Base weights come from the seed on every rank: nothing but masks is sent. A round
  deals the next task groups (the groups of ``tasks_at_once`` tasks a single process trains one after
  another) to the replicas, one each; at its end every rank all-gathers the groups' packed masks and
  per-task BatchNorm statistics and freezes them in task order. Every rank then holds the model one
  process has after those groups: the same bytes, for any number of ranks (given the same kind of device
  and threads per rank; see ``tests/test_batched_training.py`` on threads).
- **Data parallelism.** With ``ranks_per_task`` G > 1 a replica is G ranks that train one group together:
  each computes the loss on 1/G of every batch, DDP averages the scores' gradients, and BatchNorm
  statistics of the tasks being trained are those of the whole batch (gathered across the G ranks, with
  autograd through them). N ranks are N / G replicas training N / G groups at once.
- **Sharded banks.** ``shard_banks`` spreads every layer's masks over the ranks (``bank.ShardedMaskBank``)
  for task inference over more masks than one device holds; every rank then runs the same inference.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from supsup.bank import ShardedMaskBank
from supsup.data.streams import TaskStream
from supsup.evaluation import Evaluation, evaluate as evaluate_tasks
from supsup.inference import Inference
from supsup.layers import MultitaskBatchNorm
from supsup.learners import TrainConfig, fit_task_group
from supsup.masks import pack_bits
from supsup.model import SupermaskModel

TIMEOUT_ENV = "SUPSUP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed (a rank died, or did not answer within the timeout), or another rank failed."""


@dataclass(frozen=True)
class World:
    """The ranks of this job as supsup uses them; ``World()`` is one process.

    Ranks ``[j·G, (j + 1)·G)`` form replica j (G = ``ranks_per_task``); ``group`` is this rank's replica
    as a process group (None when G = 1). Rank 0 owns the run directory."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    ranks_per_task: int = 1
    group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def replicas(self) -> int:
        return self.size // self.ranks_per_task

    @property
    def replica(self) -> int:
        return self.rank // self.ranks_per_task

    @property
    def writes(self) -> bool:
        """Whether this rank writes files (rank 0)."""
        return self.rank == 0

    def ranks_of(self, replica: int) -> list[int]:
        return list(range(replica * self.ranks_per_task, (replica + 1) * self.ranks_per_task))

    def describe(self) -> dict:
        return {"world_size": self.size, "ranks_per_task": self.ranks_per_task, "backend": self.backend}

    # ------------------------------------------------------------------ collectives
    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # gloo / NCCL: a closed connection, a timeout, an aborted communicator
            raise DistributedError(f"rank {self.rank} of {self.size} stopped while {what}, because "
                                   f"{_reason(err, self)}") from err

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``[size, *shape]``: every rank's ``tensor`` (same shape everywhere), on every rank."""
        if self.size == 1:
            return tensor.unsqueeze(0)
        out = torch.empty(self.size, *tensor.shape, dtype=tensor.dtype, device=tensor.device)
        with self._collective(what):
            dist.all_gather(list(out.unbind(0)), tensor.contiguous())
        return out

    def all_gather_object(self, obj, what: str) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        with self._collective(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, what: str):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        with self._collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None, what: str) -> None:
        """Collective: if any rank passes an error, every rank raises (the rank that had it, its own error;
        the others a ``DistributedError`` naming it), so no rank goes on alone into the next collective."""
        if self.size > 1:
            messages = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}", what)
            first = next((i for i, m in enumerate(messages) if m is not None), None)
            if first is not None and error is None:
                raise DistributedError(f"rank {first} of {self.size} failed while {what}: {messages[first]}")
        if error is not None:
            raise error

    def on_writer(self, fn: Callable[[], Any], what: str):
        """Run ``fn`` on rank 0 while the others wait; its result on rank 0 (None elsewhere), its error
        everywhere."""
        result, error = None, None
        if self.writes:
            try:
                result = fn()
            except Exception as err:  # handed to every rank by agree
                error = err
        self.agree(error, what)
        return result

    def writer_first(self, fn: Callable[[], Any], what: str):
        """``fn()`` on every rank, rank 0 first (e.g. it fetches data that the others then read)."""
        result = self.on_writer(fn, what)
        if not self.writes:
            result = fn()
        return result


def _reason(err: RuntimeError, world: World) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if text.startswith("[") and "] " in text:  # gloo prefixes its source location
        text = text.split("] ", 1)[1]
    text = text.split(". ")[0][:200]
    lower = text.lower()
    if any(s in lower for s in ("closed by peer", "connection reset", "broken pipe", "connection refused")):
        why = "another rank stopped (its process ended or was killed)"
    elif "timed out" in lower or "timeout" in lower:
        why = f"not every rank answered within {world.timeout_s:g} s (set {TIMEOUT_ENV} to wait longer)"
    else:
        why = "a collective failed"
    return f"{why}: {text}"


# ---------------------------------------------------------------------------------- joining
def launched() -> bool:
    """Whether this process is one of several (``WORLD_SIZE`` > 1, as torchrun and srun set it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def init(device: str = "cpu", ranks_per_task: int = 1, timeout_s: float | None = None) -> World:
    """Join the job that the environment describes (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when ``device`` is CUDA (this rank's GPU: ``cuda:LOCAL_RANK``,
    made the current device), gloo otherwise. Without such an environment, one process: ``World()``.
    ``ranks_per_task`` must divide the number of ranks. ``timeout_s`` defaults to ``$SUPSUP_DIST_TIMEOUT``."""
    timeout_s = _timeout_from_env() if timeout_s is None else timeout_s
    if ranks_per_task < 1:
        raise ValueError(f"ranks_per_task must be >= 1, got {ranks_per_task}")
    if not dist.is_initialized() and not launched():
        if ranks_per_task != 1:
            raise ValueError(f"ranks_per_task {ranks_per_task} needs as many processes: launch with torchrun")
        return World(timeout_s=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.device(device).index is not None:
            raise ValueError(f"--device {device} names one GPU, but each rank uses its own (cuda:LOCAL_RANK): "
                             f"pass --device cuda")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"cannot join the job (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                                   f"MASTER_PORT={os.environ.get('MASTER_PORT')}, RANK={os.environ.get('RANK')}, "
                                   f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}): {err}") from err
    rank, size = dist.get_rank(), dist.get_world_size()
    if size % ranks_per_task:
        raise ValueError(f"ranks_per_task {ranks_per_task} does not divide the {size} ranks")
    group = None
    if ranks_per_task > 1:
        for replica in range(size // ranks_per_task):  # every rank creates every group, in the same order
            ranks = list(range(replica * ranks_per_task, (replica + 1) * ranks_per_task))
            created = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            if rank in ranks:
                group = created
    return World(rank, size, local_rank, dist.get_backend(), ranks_per_task, group, timeout_s)


def close(world: World) -> None:
    """Leave the job (destroys the process group)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- task-parallel rounds
def round_groups(first: int, end: int, tasks_at_once: int, replicas: int,
                 until: int | None = None) -> list[tuple[int, int]]:
    """The next round: ``(first task, count)`` for replicas 0, 1, ...: the groups a single process would
    train next (``[first, first + K)``, ``[first + K, first + 2K)``, ..., the last one cut at task ``end``),
    at most one per replica, none starting at or after ``until`` (default ``end``)."""
    starts = range(first, end if until is None else min(until, end), tasks_at_once)[:replicas]
    return [(s, min(tasks_at_once, end - s)) for s in starts]


def train_round(model: SupermaskModel, stream: TaskStream, cfg: TrainConfig, world: World = World(),
                on_batch: Callable[[int, torch.Tensor], None] | None = None,
                until: int | None = None) -> list[list[int]]:
    """Train the next round of task groups (see ``round_groups``; ``until`` defaults to the stream's end,
    and no group starts at or after it) and freeze them, in task order, on every rank.
    ``on_batch(n, loss)`` after every step of this rank, n = the tasks of the round and ``loss`` this rank's
    summed per-task losses scaled to n tasks (the progress of the whole round). Returns, for each task
    trained, the ranks that trained it."""
    groups = round_groups(model.num_tasks, stream.num_tasks, cfg.tasks_at_once, world.replicas, until)
    if not groups:
        raise ValueError(f"no task left to learn before task {until or stream.num_tasks}: {model.num_tasks} are "
                         f"learned")
    if cfg.batch_size % world.ranks_per_task:
        raise ValueError(f"batch size {cfg.batch_size} cannot be split between the {world.ranks_per_task} ranks "
                         f"that train a task: choose a multiple of {world.ranks_per_task}")
    if world.replicas > 1 and model.per_task_tensors():
        raise ValueError("per-task biases and norm affines (bias='per-task', norm_affine='per-task') are not sent "
                         "between ranks: train this model in one process, or with every rank on the same task "
                         "group (ranks_per_task = the world size)")
    in_round = sum(count for _, count in groups)
    mine = groups[world.replica] if world.replica < len(groups) else None
    if mine is not None:
        ids = model.begin_tasks(mine[1], first=mine[0])
        data_parallel = DataParallel(world) if world.ranks_per_task > 1 else None
        report = None if on_batch is None else lambda count, loss: on_batch(in_round, loss * (in_round / count))
        fit_task_group(model, stream, cfg, report, data_parallel)
    if world.replicas > 1:  # (one replica: every rank trained the same group, nothing to send)
        packet = _packet(model, ids if mine else [], cfg.tasks_at_once)
        last = sum(groups[-1]) - 1
        what = f"task {last}" if last == groups[0][0] else f"tasks {groups[0][0]}-{last}"
        packets = world.all_gather(packet, f"gathering the masks of {what}")
    for replica, (first, count) in enumerate(groups):
        if replica == world.replica:
            model.end_tasks()
        else:
            _install(model, packets[replica * world.ranks_per_task], first, count, cfg.tasks_at_once)
    model.eval()
    return [world.ranks_of(replica) for replica, (_, count) in enumerate(groups) for _ in range(count)]


def _packet(model: SupermaskModel, ids: list[int], capacity: int) -> torch.Tensor:
    """This rank's trained tasks as one uint8 tensor of a fixed size (``capacity`` tasks): per masked layer
    the packed masks ``[K, ⌈P/8⌉]``, per BatchNorm the running mean and variance ``[K, C]`` float32."""
    parts = []
    device = model.mask_layers()[0].weight.device
    for layer in model.mask_layers():
        rows = torch.zeros(capacity, layer.bank.row_bytes, dtype=torch.uint8, device=device)
        if ids:
            rows[: len(ids)] = pack_bits(layer.final_masks().reshape(len(ids), -1))
        parts.append(rows.reshape(-1))
    for norm in model.norm_layers():
        stats = torch.zeros(2, capacity, norm.num_features, dtype=torch.float32, device=device)
        if ids:
            stats[0, : len(ids)] = norm.running_mean[ids[0] : ids[-1] + 1]
            stats[1, : len(ids)] = norm.running_var[ids[0] : ids[-1] + 1]
        parts.append(stats.reshape(-1).view(torch.uint8))
    return torch.cat(parts)


def _install(model: SupermaskModel, packet: torch.Tensor, first: int, count: int, capacity: int) -> None:
    """Freeze the ``count`` tasks from ``first`` that another replica trained (see ``_packet``)."""
    if model.num_tasks != first:
        raise RuntimeError(f"tasks from {first} cannot be added after {model.num_tasks} learned tasks")
    offset = 0
    for layer in model.mask_layers():
        size = capacity * layer.bank.row_bytes
        layer.bank.add_packed(packet[offset : offset + size].view(capacity, -1)[:count])
        offset += size
    for norm in model.norm_layers():
        size = 2 * capacity * norm.num_features * 4
        stats = packet[offset : offset + size].clone().view(torch.float32).view(2, capacity, -1)  # aligned
        norm.ensure_tasks(first + count)
        norm.running_mean[first : first + count] = stats[0, :count]
        norm.running_var[first : first + count] = stats[1, :count]
        offset += size


# ---------------------------------------------------------------------------------- data parallelism
class DataParallel:
    """A ``learners.Replica``: this rank's share of every batch, and DDP over the scores within its
    replica (the G ranks that train the same tasks); BatchNorm becomes ``SyncedBatchNorm``."""

    def __init__(self, world: World):
        self.group, self.size, self.index = world.group, world.ranks_per_task, world.rank % world.ranks_per_task

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        rows = batch.shape[0] // self.size
        return batch[self.index * rows : (self.index + 1) * rows]

    def wrap(self, model: SupermaskModel) -> DistributedDataParallel:
        synchronise_batchnorm(model, self.group)
        with warnings.catch_warnings():  # its successor, forward_sync_buffers=False, would still send the banks
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            return DistributedDataParallel(model, process_group=self.group, broadcast_buffers=False)


class _AllReduce(torch.autograd.Function):
    """Σ over the ranks of ``group``, differentiable: the gradient is the Σ of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class SyncedBatchNorm(MultitaskBatchNorm):
    """``MultitaskBatchNorm`` whose tasks being trained normalise with the statistics of the whole batch
    of a data-parallel group: each rank's per-channel mean and variance ``[2, C]`` are gathered (one
    all-reduce, differentiable), merged exactly (equal shares), and the running statistics updated with
    them, so every rank holds the same ones. Everything else is ``MultitaskBatchNorm``'s."""

    group: Any = None

    def _norm(self, x: torch.Tensor, task: int) -> torch.Tensor:
        if not (self.training and (self.updating is None or task in self.updating)):
            return super()._norm(x, task)
        dims = [0, *range(2, x.dim())]
        size, index = dist.get_world_size(self.group), dist.get_rank(self.group)
        mine = torch.stack([x.mean(dims), x.var(dims, unbiased=False)]).unsqueeze(0)  # [1, 2, C]
        pad = [mine.new_zeros(index, *mine.shape[1:]), mine, mine.new_zeros(size - 1 - index, *mine.shape[1:])]
        stats = _AllReduce.apply(torch.cat(pad), self.group)  # [G, 2, C]: an all-gather with autograd
        mean = stats[:, 0].mean(0)
        var = stats[:, 1].mean(0) + (stats[:, 0] - mean).square().mean(0)
        count = size * x.numel() // x.shape[1]
        with torch.no_grad():
            self.running_mean[task].lerp_(mean, self.momentum)
            self.running_var[task].lerp_(var * count / max(count - 1, 1), self.momentum)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)


def synchronise_batchnorm(model: SupermaskModel, group) -> None:
    """Replace every ``MultitaskBatchNorm`` of ``model`` by a ``SyncedBatchNorm`` over ``group`` (same
    statistics tensors, same state_dict keys); in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultitaskBatchNorm) and not isinstance(child, SyncedBatchNorm):
                synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum)
                synced.group = group
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.train(child.training)
                setattr(parent, name, synced)


# ---------------------------------------------------------------------------------- evaluation, sharding
def evaluate(world: World, model: SupermaskModel, stream: TaskStream, scenario: str, how: Inference,
             seed: int, on_task: Callable | None = None, tasks: list[int] | None = None) -> Evaluation:
    """``supsup.evaluation.evaluate`` of ``tasks`` (all learned by default) dealt to the ranks (rank r: the
    r-th, (r + N)-th, ... of them) of a model every rank holds whole; the figures are gathered, in task
    order, on every rank."""
    tasks = list(range(model.num_tasks)) if tasks is None else tasks
    part = evaluate_tasks(model, stream, scenario, how, tasks=tasks[world.rank::world.size], seed=seed,
                          on_task=on_task)
    if world.size == 1:
        return part
    gathered = world.all_gather_object(part.tasks, "gathering the evaluation")
    return Evaluation(scenario, sorted((r for rank in gathered for r in rank), key=lambda r: r.task))


def shard_banks(model: SupermaskModel, group=None) -> SupermaskModel:
    """Spread every layer's masks over the ranks of ``group`` (default: all), in place: rank r keeps tasks
    r, r + N, ... (``bank.ShardedMaskBank``). Collective; every rank must hold the same model."""
    for layer in model.mask_layers():
        if not isinstance(layer.bank, ShardedMaskBank):
            layer.bank = ShardedMaskBank.from_bank(layer.bank, group)
    return model


def unshard_banks(model: SupermaskModel) -> SupermaskModel:
    """Gather every sharded bank back into a whole ``MaskBank`` on every rank (e.g. to save), in place."""
    for layer in model.mask_layers():
        if isinstance(layer.bank, ShardedMaskBank):
            layer.bank = layer.bank.unshard()
    return model
