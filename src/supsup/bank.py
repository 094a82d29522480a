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
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from supsup import kernels
from supsup.masks import pack_bits, packed_size, unpack_bits


class MaskBank(nn.Module):
    """Frozen binary masks of one layer with weight shape ``shape``; row t is task t.

    A module so that ``.to(device)`` moves it with its layer and ``state_dict()`` carries ``packed``.
    The count is an integer buffer, so ``.to(torch.bfloat16)`` leaves it exact.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None,
                 capacity: int = 8):
        super().__init__()
        self.shape = torch.Size(shape)
        self.num_weights = self.shape.numel()
        self.row_bytes = packed_size(self.num_weights)
        self.register_buffer("_packed", kernels.new_store(capacity, self.row_bytes, device), persistent=False)
        self.register_buffer("mask_sum", torch.zeros(self.num_weights, dtype=torch.int32, device=device),
                             persistent=False)
        self.num_tasks = 0
        self.version = 0  # bumped on every change of the stored masks (add, replace, load)

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
    def nbytes_per_task(self) -> int:
        """Bytes one task's mask costs in this bank: ⌈P/8⌉."""
        return self.row_bytes

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

    def add(self, masks: torch.Tensor) -> list[int]:
        """Append masks ``[*shape]`` or ``[n, *shape]`` (any dtype, nonzero = kept); returns task ids."""
        if masks.shape == self.shape:
            masks = masks.unsqueeze(0)
        if masks.shape[1:] != self.shape:
            raise ValueError(f"mask shape {tuple(masks.shape[1:])} does not match weight shape {tuple(self.shape)}")
        flat = masks.reshape(masks.shape[0], -1).to(device=self.device, dtype=torch.bool)
        first = self.num_tasks
        self._reserve(first + flat.shape[0])
        kernels.write_rows(self._packed, first, pack_bits(flat))
        self.mask_sum += flat.sum(0, dtype=torch.int32)
        self.num_tasks += flat.shape[0]
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
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != self.row_bytes:
            raise ValueError(f"expected packed masks [k, {self.row_bytes}] uint8, got {tuple(packed.shape)} {packed.dtype}")
        self.num_tasks = 0
        self._packed = kernels.new_store(packed.shape[0], self.row_bytes, self.device)
        kernels.write_rows(self._packed, 0, packed)
        self.num_tasks = packed.shape[0]
        self.version += 1
        self.recount()

    def recount(self) -> None:
        """Recompute the running sum of masks from the stored bits (Σ_i 1 · M_i, one kernel pass)."""
        if self.num_tasks == 0:
            self.mask_sum.zero_()
            return
        ones = torch.ones(self.num_tasks, dtype=torch.float32, device=self.device)
        counts = kernels.superpose(self._stored, ones, self.num_weights)
        self.mask_sum.copy_(counts.round().int())  # exact below 2^24 tasks

    # ------------------------------------------------------------------- state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "packed"] = self.packed if keep_vars else self.packed.detach()

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

    # ----------------------------------------------------------------- reading
    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is not learned: this bank holds tasks 0..{self.num_tasks - 1}")

    def mask(self, task: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Mask of one task, ``[*shape]``."""
        self._check_task(task)
        one = kernels.tasks(self._packed, slice(task, task + 1))
        if dtype == torch.bool:
            return unpack_bits(kernels.rows(one, self.row_bytes)[0], self.num_weights).view(self.shape)
        return kernels.unpack(one, self.num_weights, dtype=dtype).view(self.shape)

    def masked_weight(self, task: int, weight: torch.Tensor) -> torch.Tensor:
        """``weight ⊙ M_task`` as ``[*shape]`` float32 in one pass over the bits."""
        self._check_task(task)
        one = kernels.tasks(self._packed, slice(task, task + 1))
        return kernels.unpack(one, self.num_weights, weight).view(self.shape)

    def masks(self, tasks: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Masks of several tasks, ``[n, *shape]`` (n small: this is a float/bool copy)."""
        rows = kernels.tasks(self._packed, tasks)
        if dtype == torch.bool:
            return unpack_bits(kernels.rows(rows, self.row_bytes), self.num_weights).view(-1, *self.shape)
        return kernels.unpack(rows, self.num_weights, dtype=dtype).view(-1, *self.shape)

    def chunk_rows(self) -> int:
        return kernels.chunk_rows(self.num_weights)

    def iter_masks(self, dtype: torch.dtype = torch.float32,
                   weight: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_task, masks [c, P])`` over the learned tasks in bounded-memory chunks
        (``weight ⊙ masks`` when ``weight`` is given)."""
        return kernels.iter_unpacked(self._stored, self.num_weights, dtype, weight)

    # ----------------------------------------------------------- superposition
    def mean_mask(self) -> torch.Tensor:
        """Σ_i M_i / k as ``[*shape] float32`` (the uniform-α superposition), from the running count."""
        if self.num_tasks == 0:
            raise RuntimeError("the mask bank is empty: learn a task first")
        return (self.mask_sum.float() / self.num_tasks).view(self.shape)

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

    def _check_alpha(self, alpha: torch.Tensor) -> None:
        if alpha.shape[-1] != self.num_tasks:
            raise ValueError(f"alpha has {alpha.shape[-1]} entries but {self.num_tasks} tasks are learned")
