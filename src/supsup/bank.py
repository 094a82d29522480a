"""The mask bank: every frozen mask of one layer, bit-packed, one row per learned task.

Storage is 1 bit per weight in a growable buffer, plus the running count of masks per weight ``[P] int32``
so that the uniform superposition (the mean mask) costs nothing. The buffer is in the kernels' layout for
its device (``supsup.kernels``: rows ``[k, ⌈P/8⌉] uint8``, on the CPU column tiles); ``packed`` is always
the canonical rows.
``state_dict()`` holds the learned rows as ``packed [k, ⌈P/8⌉] uint8``; ``load_state_dict`` grows the
bank to the rows it finds and recounts (so ``torch.save(model.state_dict())`` keeps every task).
Superposition and its α-gradient are computed straight from the packed bits by ``supsup.kernels``
(C on the CPU, Triton on the GPU, chunked torch elsewhere), never through a float ``[k, P]`` tensor.
Memory per task is ⌈P/8⌉ bytes; the buffer grows by doubling (``reserve`` pre-sizes it).

``ShardedMaskBank`` is the same interface over the ranks of a ``torch.distributed`` process group, for
banks too large for one device: rank r of N holds tasks r, r + N, r + 2N, ... (≈ k/N rows).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from supsup import kernels
from supsup.masks import pack_bits, packed_size, unpack_bits


class _Bank(nn.Module):
    """What both banks share: the weight shape, the running mask count ``mask_sum [P] int32`` of all k
    tasks, and the reads built on ``_rows`` (packed rows of some tasks)."""

    def __init__(self, shape: torch.Size | tuple[int, ...], device: torch.device | str | None):
        super().__init__()
        self.shape = torch.Size(shape)
        self.num_weights = self.shape.numel()
        self.row_bytes = packed_size(self.num_weights)
        self.register_buffer("mask_sum", torch.zeros(self.num_weights, dtype=torch.int32, device=device),
                             persistent=False)
        self.num_tasks = 0
        self.version = 0  # bumped on every change of the stored masks (add, replace, load)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "packed"
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        packed = state_dict[key]
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2 \
                or packed.shape[1] != self.row_bytes:
            got = f"{tuple(packed.shape)} {packed.dtype}" if isinstance(packed, torch.Tensor) else type(packed).__name__
            error_msgs.append(f"{key}: expected packed masks [k, {self.row_bytes}] uint8 for weight shape "
                              f"{tuple(self.shape)}, got {got}")
            return
        self.load_packed(packed)

    def _rows(self, index: slice | torch.Tensor) -> torch.Tensor:
        """Packed rows ``[n, ⌈P/8⌉]`` of the tasks ``range(k)[index]`` (a slice or a tensor of ids)."""
        raise NotImplementedError

    @property
    def nbytes_per_task(self) -> int:
        """Bytes one task's mask costs in this bank: ⌈P/8⌉."""
        return self.row_bytes

    def _flat(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks ``[*shape]`` or ``[n, *shape]`` (any dtype, nonzero = kept) as ``[n, P] bool``."""
        if masks.shape == self.shape:
            masks = masks.unsqueeze(0)
        if masks.shape[1:] != self.shape:
            raise ValueError(f"mask shape {tuple(masks.shape[1:])} does not match weight shape {tuple(self.shape)}")
        return masks.reshape(masks.shape[0], -1).to(device=self.mask_sum.device, dtype=torch.bool)

    def _check_packed(self, rows: torch.Tensor) -> None:
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != self.row_bytes:
            raise ValueError(f"expected packed masks [k, {self.row_bytes}] uint8, got {tuple(rows.shape)} {rows.dtype}")

    def _count(self, stored: torch.Tensor) -> torch.Tensor:
        """Σ_i M_i ``[P] int32`` of masks in a storage layout (one kernel pass; exact below 2^24 masks)."""
        n = kernels.num_masks(stored)
        if n == 0:
            return torch.zeros(self.num_weights, dtype=torch.int32, device=stored.device)
        ones = torch.ones(n, dtype=torch.float32, device=stored.device)
        return kernels.superpose(stored, ones, self.num_weights).round().int()

    def add(self, masks: torch.Tensor) -> list[int]:
        """Append masks ``[*shape]`` or ``[n, *shape]`` (any dtype, nonzero = kept); returns task ids."""
        return self.add_packed(pack_bits(self._flat(masks)))

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is not learned: this bank holds tasks 0..{self.num_tasks - 1}")

    def _check_alpha(self, alpha: torch.Tensor) -> None:
        if alpha.shape[-1] != self.num_tasks:
            raise ValueError(f"alpha has {alpha.shape[-1]} entries but {self.num_tasks} tasks are learned")

    def mask(self, task: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Mask of one task, ``[*shape]``."""
        self._check_task(task)
        row = self._rows(slice(task, task + 1))
        if dtype == torch.bool:
            return unpack_bits(row[0], self.num_weights).view(self.shape)
        return kernels.unpack(row, self.num_weights, dtype=dtype).view(self.shape)

    def masks(self, tasks: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Masks of several tasks, ``[n, *shape]`` (n small: this is a float/bool copy)."""
        rows = self._rows(tasks)
        if dtype == torch.bool:
            return unpack_bits(rows, self.num_weights).view(-1, *self.shape)
        return kernels.unpack(rows, self.num_weights, dtype=dtype).view(-1, *self.shape)

    def chunk_rows(self) -> int:
        return kernels.chunk_rows(self.num_weights)

    def iter_masks(self, dtype: torch.dtype = torch.float32,
                   weight: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_task, masks [c, P])`` over the learned tasks in bounded-memory chunks
        (``weight ⊙ masks`` when ``weight`` is given)."""
        rows = self.chunk_rows()
        for start in range(0, self.num_tasks, rows):
            chunk = self._rows(slice(start, min(start + rows, self.num_tasks)))
            yield start, kernels.unpack(chunk, self.num_weights, weight, dtype)

    def mean_mask(self) -> torch.Tensor:
        """Σ_i M_i / k as ``[*shape] float32`` (the uniform-α superposition), from the running count."""
        if self.num_tasks == 0:
            raise RuntimeError("the mask bank is empty: learn a task first")
        return (self.mask_sum.float() / self.num_tasks).view(self.shape)


class MaskBank(_Bank):
    """Frozen binary masks of one layer with weight shape ``shape``; row t is task t.

    A module so that ``.to(device)`` moves it with its layer (and its storage to that device's layout) and
    ``state_dict()`` carries ``packed``. The count is an integer buffer, so ``.to(torch.bfloat16)`` leaves it
    exact.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None,
                 capacity: int = 8):
        super().__init__(shape, device)
        self.register_buffer("_packed", kernels.new_store(capacity, self.row_bytes, device), persistent=False)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, tasks={self.num_tasks}, bytes_per_task={self.row_bytes}"

    # ----------------------------------------------------------------- storage
    @property
    def device(self) -> torch.device:
        return self._packed.device

    @property
    def packed(self) -> torch.Tensor:
        """``[k, ⌈P/8⌉] uint8``: the learned masks as rows (a view, or on the CPU a copy of the tiles)."""
        return kernels.rows(self._stored, self.row_bytes)

    @property
    def _stored(self) -> torch.Tensor:
        """The learned masks in the storage layout (a view): what the kernels read."""
        return kernels.tasks(self._packed, slice(0, self.num_tasks))

    @property
    def capacity(self) -> int:
        """Rows allocated (learned + spare)."""
        return kernels.store_capacity(self._packed)

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` tasks in total without copying again (e.g. before learning 100,000 tasks)."""
        if rows > self.capacity:
            self._grow_to(rows)

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        self._grow_to(max(rows, 2 * self.capacity))

    def _grow_to(self, capacity: int) -> None:
        grown = kernels.new_store(capacity, self.row_bytes, self.device)
        kernels.tasks(grown, slice(0, self.num_tasks)).copy_(self._stored)
        self._packed = grown

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._packed = kernels.relayout(self._packed, self.row_bytes)  # e.g. rows on the GPU, tiles on the CPU
        return self

    def add_packed(self, rows: torch.Tensor) -> list[int]:
        """Append packed masks ``[n, ⌈P/8⌉] uint8`` (as ``packed`` holds them); returns their task ids."""
        self._check_packed(rows)
        first, n = self.num_tasks, rows.shape[0]
        self._reserve(first + n)
        kernels.write_rows(self._packed, first, rows)
        self.mask_sum += self._count(kernels.tasks(self._packed, slice(first, first + n)))
        self.num_tasks += n
        self.version += 1
        return list(range(first, self.num_tasks))

    def replace(self, task: int, mask: torch.Tensor) -> None:
        """Overwrite the mask of learned ``task`` (a mask that keeps training, e.g. in scenario NNs)."""
        self._check_task(task)
        if mask.shape != self.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(self.shape)}")
        new = mask.reshape(-1).to(device=self.device, dtype=torch.bool)
        old = kernels.unpack(kernels.tasks(self._packed, slice(task, task + 1)), self.num_weights)[0]
        self.mask_sum += new.int() - old.int()
        kernels.write_rows(self._packed, task, pack_bits(new).unsqueeze(0))
        self.version += 1

    def load_packed(self, packed: torch.Tensor) -> None:
        """Replace the contents with ``[k, ⌈P/8⌉] uint8`` rows (e.g. from a checkpoint)."""
        self._check_packed(packed)
        self.num_tasks = 0
        self._packed = kernels.new_store(packed.shape[0], self.row_bytes, self.device)
        kernels.write_rows(self._packed, 0, packed)
        self.num_tasks = packed.shape[0]
        self.version += 1
        self.recount()

    def recount(self) -> None:
        """Recompute the running sum of masks from the stored bits (Σ_i 1 · M_i, one kernel pass)."""
        self.mask_sum.copy_(self._count(self._stored))

    # ------------------------------------------------------------------- state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        rows = self.packed
        if rows.untyped_storage().nbytes() != rows.nbytes:  # a view of spare capacity: torch.save would keep it
            rows = rows.clone()
        destination[prefix + "packed"] = rows if keep_vars else rows.detach()

    # ----------------------------------------------------------------- reading
    def _rows(self, index: slice | torch.Tensor) -> torch.Tensor:
        return kernels.rows(kernels.tasks(self._stored, index), self.row_bytes)

    def masked_weight(self, task: int, weight: torch.Tensor) -> torch.Tensor:
        """``weight ⊙ M_task`` as ``[*shape]`` float32 in one pass over the bits."""
        self._check_task(task)
        one = kernels.tasks(self._packed, slice(task, task + 1))
        return kernels.unpack(one, self.num_weights, weight).view(self.shape)

    def iter_masks(self, dtype: torch.dtype = torch.float32,
                   weight: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_task, masks [c, P])`` over the learned tasks in bounded-memory chunks
        (``weight ⊙ masks`` when ``weight`` is given)."""
        step = self.chunk_rows()
        for start in range(0, self.num_tasks, step):
            chunk = kernels.tasks(self._stored, slice(start, start + step))
            yield start, kernels.unpack(chunk, self.num_weights, weight, dtype)

    # ----------------------------------------------------------- superposition
    def superpose(self, alpha: torch.Tensor) -> torch.Tensor:
        """Σ_i α_i M_i for ``alpha [k]`` -> ``[*shape] float32``."""
        self._check_alpha(alpha)
        return kernels.superpose(self._stored, alpha, self.num_weights).view(self.shape)

    def superpose_many(self, alpha: torch.Tensor) -> torch.Tensor:
        """Σ_i α_bi M_i for ``alpha [n, k]`` -> ``[n, *shape] float32`` (n superpositions at once)."""
        self._check_alpha(alpha)
        return kernels.superpose(self._stored, alpha, self.num_weights).reshape(-1, *self.shape)

    def contract(self, grad: torch.Tensor) -> torch.Tensor:
        """``[k] = M @ g`` for ``g [*shape]``: ∂L/∂α_i when ``g = ∂L/∂(Σα M) = ∂L/∂W_eff ⊙ W``.
        ``grad [n, *shape]`` gives ``[n, k]``: n contractions in one pass over the bits."""
        if grad.shape == self.shape:
            return kernels.contract(self._stored, grad.reshape(-1))
        if grad.shape[1:] != self.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} does not match weight shape {tuple(self.shape)}")
        return kernels.contract(self._stored, grad.reshape(grad.shape[0], -1))

    def contract_factored(self, delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[n, k]``, row b ``δ_bᵀ (W ⊙ M_i) x_b`` for a linear layer's ``weight [out, in]``, ``δ = ∂L/∂y [n, out]``
        and inputs ``x [n, in]``: sample b's ``contract((δ_b x_bᵀ) ⊙ W)`` without forming that ``[n, P]`` g."""
        if self.shape != weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the masks' {tuple(self.shape)}")
        return kernels.contract_factored(self._stored, delta, x, weight)


class ShardedMaskBank(_Bank):
    """One layer's masks spread over the N ranks of a process group: rank r holds tasks r, r + N, ...

    The interface of ``MaskBank``, so it plugs in under a layer (``layer.bank = ShardedMaskBank.from_bank(...)``).
    Every method that reads or changes masks is a collective: all ranks call it in the same order with the
    same arguments (run the same inference on the same inputs), and get what the unsharded bank gives:

    - ``mask_sum`` is the count over all k tasks, the all-reduce of the ranks' own counts, redone on every
      change, so the mean mask (One-Shot's forward) needs no communication;
    - ``superpose`` / ``superpose_many``: each rank's partial sum, then one all-reduce of ``[n, P]`` floats
      (summed in another order than one bank: equal up to float rounding);
    - ``contract`` fills only this rank's tasks' entries of ``[n, k]`` (zeros elsewhere): α-gradients are
      computed per shard, summed over layers by autograd, and completed by one ``gather`` (one all-gather
      of ``[n, k]`` floats in all; ``supsup.inference`` does it);
    - ``mask``, ``masks`` and ``iter_masks`` fetch rows from their owners (an all-reduce of packed bytes).

    Memory per rank: ⌈(k − r)/N⌉ · ⌈P/8⌉ bytes of masks plus ``mask_sum``. ``state_dict()`` is refused
    (it would hold a part of the model): ``unshard`` first. Loading a full state keeps this rank's rows.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None):
        super().__init__(shape, device)
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.__dict__["local"] = MaskBank(shape, device)  # not a submodule: its state_dict would be a part

    @classmethod
    def from_bank(cls, bank: MaskBank, group: dist.ProcessGroup | None = None) -> "ShardedMaskBank":
        """A sharded copy of ``bank`` (the same on every rank); this rank keeps its own rows."""
        sharded = cls(bank.shape, group, bank.device)
        sharded.load_packed(bank.packed)
        sharded.version = bank.version + 1  # never equal to the version a layer cached a mask under
        return sharded

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, tasks={self.num_tasks}, rank {self.rank} of {self.world_size} holds "
                f"{self.local.num_tasks}, bytes_per_task={self.row_bytes}")

    def _apply(self, fn, recurse: bool = True):
        self.local._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def local_tasks(self) -> range:
        """Ids of the tasks this rank holds, in the order of its rows."""
        return range(self.rank, self.num_tasks, self.world_size)

    @property
    def nbytes(self) -> int:
        """Bytes of masks held on this rank: ⌈(k − r)/N⌉ · ⌈P/8⌉."""
        return self.local.num_tasks * self.row_bytes

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` tasks in total (this rank's share of them) without copying again."""
        self.local.reserve(len(range(self.rank, rows, self.world_size)))

    # ----------------------------------------------------------------- changes (collective)
    def _sync_count(self) -> None:
        self.mask_sum.copy_(self.local.mask_sum)
        dist.all_reduce(self.mask_sum, group=self.group)

    def add_packed(self, rows: torch.Tensor) -> list[int]:
        """Append packed masks ``[n, ⌈P/8⌉] uint8``, the same on every rank; each keeps its own."""
        self._check_packed(rows)
        first = self.num_tasks
        mine = rows[(self.rank - first) % self.world_size :: self.world_size]
        if mine.shape[0]:
            self.local.add_packed(mine)
        self.num_tasks += rows.shape[0]
        self.version += 1
        self._sync_count()
        return list(range(first, self.num_tasks))

    def replace(self, task: int, mask: torch.Tensor) -> None:
        """Overwrite the mask of learned ``task`` (the same mask on every rank)."""
        self._check_task(task)
        if task % self.world_size == self.rank:
            self.local.replace(task // self.world_size, mask)
        self.version += 1
        self._sync_count()

    def load_packed(self, packed: torch.Tensor) -> None:
        """Replace the contents with all ``[k, ⌈P/8⌉] uint8`` rows (the same on every rank); keeps its own."""
        self._check_packed(packed)
        self.local.load_packed(packed[self.rank :: self.world_size])
        self.num_tasks = packed.shape[0]
        self.version += 1
        self._sync_count()

    def recount(self) -> None:
        self.local.recount()
        self._sync_count()

    def state_dict(self, *args, **kwargs):
        raise RuntimeError("a sharded mask bank holds only this rank's masks, so its state would be a part of the "
                           "model: gather it with supsup.distributed.unshard_banks(model) first")

    # ----------------------------------------------------------------- reading (collective)
    def _rows(self, index: slice | torch.Tensor) -> torch.Tensor:
        tasks = torch.arange(self.num_tasks)[index.cpu() if isinstance(index, torch.Tensor) else index].reshape(-1)
        rows = torch.zeros(tasks.numel(), self.row_bytes, dtype=torch.uint8, device=self.device)
        mine = (tasks % self.world_size == self.rank).nonzero().flatten()
        if mine.numel():
            rows[mine.to(self.device)] = self.local._rows((tasks[mine] // self.world_size).to(self.device))
        dist.all_reduce(rows, group=self.group)  # each row is nonzero on its owner only: the sum is the row
        return rows

    def unshard(self) -> MaskBank:
        """Every row, gathered into a ``MaskBank`` on every rank."""
        bank = MaskBank(self.shape, self.device, capacity=self.num_tasks)
        bank.load_packed(self._rows(slice(None)))
        bank.version = self.version + 1
        return bank

    # ----------------------------------------------------------- superposition (collective)
    def superpose(self, alpha: torch.Tensor) -> torch.Tensor:
        """Σ_i α_i M_i for ``alpha [k]`` -> ``[*shape] float32``: partial sums, one all-reduce."""
        self._check_alpha(alpha)
        return self._superpose(alpha.reshape(1, -1)).view(self.shape)

    def superpose_many(self, alpha: torch.Tensor) -> torch.Tensor:
        """Σ_i α_bi M_i for ``alpha [n, k]`` -> ``[n, *shape] float32``: partial sums, one all-reduce."""
        self._check_alpha(alpha)
        return self._superpose(alpha).reshape(-1, *self.shape)

    def _superpose(self, alpha: torch.Tensor) -> torch.Tensor:
        if self.local.num_tasks:
            mix = kernels.superpose(self.local._stored, alpha[:, self.rank :: self.world_size], self.num_weights)
            mix = mix.contiguous()  # a view of [n, 8·⌈P/8⌉] when 8 does not divide P; collectives need contiguity
        else:
            mix = torch.zeros(alpha.shape[0], self.num_weights, dtype=torch.float32, device=self.device)
        dist.all_reduce(mix, group=self.group)
        return mix

    def contract(self, grad: torch.Tensor) -> torch.Tensor:
        """``M @ g`` as ``MaskBank.contract``, but only this rank's tasks' entries are filled (zeros
        elsewhere): complete the sum over layers with ``gather``. No communication."""
        single = grad.shape == self.shape
        if not single and grad.shape[1:] != self.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} does not match weight shape {tuple(self.shape)}")
        g = grad.reshape(1 if single else grad.shape[0], -1)
        out = torch.zeros(g.shape[0], self.num_tasks, dtype=torch.float32, device=g.device)
        if self.local.num_tasks:
            out[:, self.rank :: self.world_size] = kernels.contract(self.local._stored, g)
        return out[0] if single else out

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-task values ``[..., k]`` correct at this rank's tasks (as ``contract`` leaves them) -> correct
        everywhere, on every rank: one all-gather of ⌈k/N⌉ values per row from each rank."""
        k, n = self.num_tasks, self.world_size
        per = -(-k // n)
        lead = values.shape[:-1]
        mine = torch.zeros(*lead, per, dtype=values.dtype, device=values.device)
        own = values[..., self.rank :: n]
        mine[..., : own.shape[-1]] = own
        parts = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.stack(parts, -1).reshape(*lead, per * n)[..., :k]  # entry j·N + r comes from rank r
