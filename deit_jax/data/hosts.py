"""Hosts and batches: which rows of a global batch each process feeds, the training stream's
data shares, and the thread that keeps the next batches ready (`deit_jax/data/pipeline.py`)."""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import NamedSharding


def process_share(
    sharding: NamedSharding, batch: int, data_axes: tuple[str, ...]
) -> tuple[int, int]:
    """(index, count): this process feeds rows [index, index + 1) * batch / count of a batch.

    Processes whose devices hold the same rows (data replicated across them) share an index and
    are fed the same examples.
    """
    mesh = sharding.mesh
    ways = math.prod(mesh.shape[a] for a in data_axes)
    if batch % ways:
        raise ValueError(
            f"Batch size {batch} does not split over the {ways} devices of mesh axes {data_axes}; "
            f"use a multiple of {ways}."
        )
    rows: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map((batch,)).items():
        start, stop, _ = index[0].indices(batch)
        rows.setdefault(device.process_index, set()).add((start, stop))
    blocks = {}
    for process, slices in rows.items():
        ordered = sorted(slices)
        if any(a[1] != b[0] for a, b in zip(ordered, ordered[1:], strict=False)):
            raise ValueError(
                f"Process {process} holds non-contiguous rows {ordered} of the batch; order the "
                "mesh devices so that each process's devices are neighbours on the data axes."
            )
        blocks[process] = (ordered[0][0], ordered[-1][1])
    distinct = sorted(set(blocks.values()))
    size = batch // len(distinct)
    if distinct != [(i * size, (i + 1) * size) for i in range(len(distinct))]:
        raise ValueError(f"The processes' batch rows {blocks} do not split the batch evenly.")
    return distinct.index(blocks[jax.process_index()]), len(distinct)


def data_shares(
    requested: int, process_share: int, process_shares: int, batch: int
) -> tuple[range, int]:
    """(this process's training data shares, their total): `requested` (0: one per process)."""
    count = int(requested) or process_shares
    if count < 1 or count % process_shares or batch % count:
        raise ValueError(
            f"config.data.num_shares={requested} must be a multiple of the {process_shares} "
            f"processes feeding the batch and divide batch_size {batch} (or be 0: one share per "
            "process)."
        )
    per_process = count // process_shares
    return range(process_share * per_process, (process_share + 1) * per_process), count


class Prefetcher:
    """Pulls items from an iterator in a daemon thread, keeping up to `size` ready."""

    _END = object()

    def __init__(self, items: Iterator[Any], size: int):
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="deit_jax-prefetch")
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # Handed to the consumer, which re-raises it.
            self._put(Failure(e))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # Stay exhausted.
            raise StopIteration
        if isinstance(item, Failure):
            if isinstance(item.error, ValueError):  # deit_jax's own, e.g. a corrupt cache chunk
                raise item.error
            raise RuntimeError("The input pipeline failed; see the cause above.") from item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@dataclasses.dataclass
class Failure:
    error: BaseException
