"""A resumable, deterministic, rank-sharded batch iterator over an in-memory data set.

Epoch ``e`` uses the permutation ``randperm(N)`` drawn from a generator seeded by ``(seed, e)``; the epoch is
cut into ``N // batch_size`` global batches (drop_last) and global batch ``b`` is split into ``world_size``
contiguous shards, rank ``r`` taking shard ``r``. The whole state is ``(epoch, position)``, so resuming from
``state_dict()`` replays exactly the same batches, and concatenating the rank shards gives the single-process
batch. A per-batch ``transform(batch, generator)`` gets a generator seeded by ``(seed, epoch, position, rank)``.

:class:`DevicePrefetcher` (CUDA) runs such an iterator one batch ahead in a background thread: the next batch is
gathered, pinned and copied to the device with ``non_blocking`` on a side stream while the current step runs. The
batches and their order are exactly those of the iterator; its :meth:`~DevicePrefetcher.state_dict` is that of the
first batch not yet handed out, so checkpoints resume at the right batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["BatchIterator", "DevicePrefetcher", "mix_seed"]

Batch = dict[str, torch.Tensor]


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a deterministic hash of ``parts`` (stable across processes and platforms)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BatchIterator:
    """Infinite iterator of per-rank batches (dicts of tensors).

    Args:
        data: a ``dict[str, Tensor]`` with equal first dimensions, or an object with ``__len__`` and
            ``__getitem__(LongTensor idx) -> dict[str, Tensor]`` (e.g. ``simdiff.data.ImageDataset``).
        batch_size: the *global* batch size; each rank gets ``batch_size // world_size`` examples.
        seed: seeds the per-epoch permutations and the transform generators.
        rank, world_size: this process's shard (defaults: single process).
        transform: optional ``transform(batch, generator) -> batch`` applied to each per-rank batch.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Batch, torch.Generator], Batch] | None = None,
    ):
        self.data = data
        self.num_examples = self._length(data)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if self.num_examples < batch_size:
            raise ValueError(f"data set has {self.num_examples} examples, fewer than one batch of {batch_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.batches_per_epoch = self.num_examples // batch_size
        self.transform = transform
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    @staticmethod
    def _length(data: Any) -> int:
        if isinstance(data, dict):
            sizes = {k: v.shape[0] for k, v in data.items()}
            if not sizes or len(set(sizes.values())) != 1:
                raise ValueError(f"data dict needs tensors with one common first dimension, got {sizes}")
            return next(iter(sizes.values()))
        return len(data)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch`` (LongTensor [N]), a pure function of ``(seed, epoch)``."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(mix_seed("perm", self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.num_examples, generator=g), epoch
        return self._perm

    def indices(self, epoch: int, position: int) -> torch.Tensor:
        """This rank's example indices (LongTensor [local_batch_size]) for batch ``position`` of ``epoch``."""
        start = position * self.batch_size + self.rank * self.local_batch_size
        return self.permutation(epoch)[start : start + self.local_batch_size]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        idx = self.indices(self.epoch, self.position)
        if isinstance(self.data, dict):
            batch = {k: v[idx] for k, v in self.data.items()}
        else:
            batch = self.data[idx]
        if self.transform is not None:
            g = torch.Generator().manual_seed(mix_seed("transform", self.seed, self.epoch, self.position, self.rank))
            batch = self.transform(batch, g)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``: the next batch to be produced."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`; a position outside the epoch is a one-line ValueError."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"BatchIterator state epoch={epoch}, position={position} is out of range "
                f"({self.batches_per_epoch} batches per epoch)"
            )
        self.epoch, self.position = epoch, position


class DevicePrefetcher:
    """Iterate ``batches`` (e.g. a :class:`BatchIterator`) with the next batch already on ``device``.

    A daemon thread takes batches in order and, on CUDA, pins their tensors and copies them to ``device`` on a side
    stream (``non_blocking``); the consumer's stream waits on the copy's event, so no host synchronisation is
    needed. On other devices the thread only gathers ahead (``.to(device)``; the trainer uses this class on CUDA
    only). ``channels_last``: 4-D floating tensors are laid out channels-last on the device (same values).

    Args:
        batches: an iterator of ``dict[str, Tensor]`` with ``state_dict()`` (the next batch it will produce).
        device: where batches go. depth: batches staged ahead (default 2).
    """

    def __init__(self, batches: Any, device: torch.device, *, channels_last: bool = False, depth: int = 2):
        self.batches, self.device, self.channels_last = batches, torch.device(device), channels_last
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state = batches.state_dict()
        self._thread = threading.Thread(target=self._work, name="simdiff-prefetch", daemon=True)
        self._thread.start()

    def _stage(self, batch: Batch) -> Batch:
        out = {}
        with torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext():
            for k, v in batch.items():
                if torch.is_tensor(v):
                    v = (v.pin_memory() if self._cuda else v).to(self.device, non_blocking=self._cuda)
                    if self.channels_last and v.dim() == 4 and v.is_floating_point():
                        v = v.contiguous(memory_format=torch.channels_last)
                out[k] = v
        return out

    def _work(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)
        try:
            while not self._stop.is_set():
                batch = next(self.batches)
                state = self.batches.state_dict()  # after this batch: where a resume continues
                staged = self._stage(batch)
                event = None
                if self._cuda:
                    event = torch.cuda.Event()
                    event.record(self._stream)
                self._put((staged, state, event))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, state, event = item
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for v in batch.values():
                if torch.is_tensor(v):
                    v.record_stream(current)  # the side stream's allocator must not reuse it while the step runs
        self._state = state
        return batch

    def state_dict(self) -> dict[str, int]:
        """The wrapped iterator's state at the first batch not yet returned by ``__next__``."""
        return dict(self._state)

    def close(self) -> None:
        """Stop the thread (batches staged but not consumed are dropped)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
