"""Cached teacher: the frozen teacher's outputs computed once, before training, and read back per step.

The teacher (base + earlier stack, new adapter off, no dropout) never changes during training, so
its output on a training row is the same every epoch. One no-grad pass over the training set's
distinct rows stores, per row of the dataset:

- UNDIAL: the final hidden states at the COUNTED positions only (those the loss reads), which
  the fused head turns into logits; ``rows x counted tokens x hidden x bytes`` in all, e.g.
  1,000 rows x 20 answer tokens x 576 x 4 bytes (fp32) = 46 MB for SmolLM2-135M;
- NPO: the teacher's sequence log-prob log p(y | x), one float per row;
- the KL retain loss: the retain rows' final hidden states at their counted positions.

Rows are keyed by their index in the dataset (the trainer adds an ``example_index`` column and
its collator passes it), so shuffling, padding, gradient accumulation and resuming all read the
right rows. Storage: in memory up to `MEMORY_LIMIT` bytes; above it a memory-mapped file in the
checkpoint folder, unlinked as soon as it is mapped (no trace on disk once the process ends),
when it needs at most half the free space there; otherwise the live teacher.

>>> hidden = CachedRows.allocate(torch.tensor([2, 1]), width=3, dtype=torch.float32)
>>> hidden.write(torch.tensor([1]), torch.ones(1, 3)); hidden.gather(torch.tensor([1, 0])).shape
torch.Size([3, 3])
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from undial_peft.training.loss import IGNORE_INDEX, sequence_logprob, shift_labels

logger = logging.getLogger(__name__)

MEMORY_LIMIT = 2**30  # 1 GiB: bytes of cache kept in RAM; larger caches go to a memory-mapped file
DISK_SHARE = 0.5  # a file cache may use at most this share of the free space where it lives
INDEX = "example_index"  # dataset column / batch key naming the dataset row


def choose_storage(nbytes: int, mode: str, folder: Path, memory_limit: int | None = None) -> tuple[str | None, str]:
    """Where a cache of ``nbytes`` goes: ("memory" | "disk" | None for the live teacher, why).

    ``mode`` "auto" picks memory up to ``memory_limit`` (default `MEMORY_LIMIT`), else disk;
    "memory" and "disk" force one (disk still needs the space).
    """
    limit = MEMORY_LIMIT if memory_limit is None else memory_limit
    if mode == "memory" or (mode == "auto" and nbytes <= limit):
        return "memory", f"{nbytes / 2**20:.1f} MiB in memory"
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if nbytes <= DISK_SHARE * free:
        return "disk", f"{nbytes / 2**20:.1f} MiB memory-mapped (over the {limit / 2**20:.0f} MiB memory limit)"
    return None, (f"it needs {nbytes / 2**20:.0f} MiB: over the {limit / 2**20:.0f} MiB memory limit and over "
                  f"{DISK_SHARE:.0%} of the {free / 2**20:.0f} MiB free beside the checkpoints")


@dataclass
class CachedRows:
    """A variable number of rows per example, stored flat: example i owns rows offsets[i]:offsets[i+1]."""

    values: torch.Tensor  # (total rows, width), in memory or memory-mapped
    offsets: torch.Tensor  # (examples + 1,) int64

    @classmethod
    def allocate(cls, counts: torch.Tensor, width: int, dtype: torch.dtype, file_in: Path | None = None) -> CachedRows:
        """Room for ``counts[i]`` rows of ``width`` values per example; in RAM, or mapped from a
        file created in ``file_in`` and unlinked at once (the mapping keeps it alive)."""
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        shape = (int(offsets[-1]), width)
        if file_in is None:
            return cls(torch.empty(shape, dtype=dtype), offsets)
        numel = shape[0] * shape[1]
        handle, path = tempfile.mkstemp(prefix=".teacher-cache-", dir=file_in)
        try:
            os.ftruncate(handle, max(numel, 1) * dtype.itemsize)
            values = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            os.close(handle)
            os.unlink(path)
        return cls(values, offsets)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        """Row numbers of the examples in ``index``, in order. (B,) -> (N,)"""
        starts, ends = self.offsets[index], self.offsets[index + 1]
        return torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)])

    def counts(self, index: torch.Tensor) -> torch.Tensor:
        """Rows stored per example. (B,) -> (B,)"""
        return self.offsets[index + 1] - self.offsets[index]

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Store the rows of the examples in ``index`` (concatenated in that order). (B,), (N, W)"""
        self.values[self._rows(index)] = values.to(self.values.dtype)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of the examples in ``index``, concatenated in that order. (B,) -> (N, W)"""
        return self.values[self._rows(index.cpu())]


def counted_per_row(labels: list[list[int]]) -> torch.Tensor:
    """Counted positions of each tokenised row: labels after the first that are not -100. -> (E,)"""
    return torch.tensor([sum(1 for y in row[1:] if y != -100) for row in labels], dtype=torch.int64)


def estimate_bytes(counts: torch.Tensor, hidden: int, itemsize: int) -> int:
    """rows x counted tokens x hidden x bytes: what the hidden-state cache of these rows takes."""
    return int(counts.sum()) * hidden * itemsize


@dataclass
class TeacherCache:
    """What the loss reads instead of a live teacher pass; any field may be absent (not needed)."""

    hidden: CachedRows | None = None  # forget rows: final hidden states at counted positions (UNDIAL)
    logprob: torch.Tensor | None = None  # (E,) forget rows: teacher sequence log-prob (NPO)
    retain_hidden: CachedRows | None = None  # retain rows: final hidden states at counted positions (KL)
    where: str = ""  # "memory" or "disk", and the size, for the log

    @property
    def nbytes(self) -> int:
        parts = (self.hidden, self.retain_hidden)
        return sum(p.nbytes for p in parts if p is not None) + (0 if self.logprob is None else self.logprob.nbytes)


Teacher = Callable[..., Any]  # teacher(**model inputs) -> model output, no grad, new adapter off


def build(
    dataset: Any,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    teacher: Teacher,
    needs: Collection[str],
    mode: str,
    folder: Path,
    batch_size: int,
    device: torch.device,
    retain_teacher: Teacher | None = None,
    earlier: tuple[Any, TeacherCache] | None = None,
) -> tuple[TeacherCache | None, str]:
    """One teacher pass over the DISTINCT rows of ``dataset``, filling what ``needs`` names.

    A dataset row pairs a forget row with a retain row, and the shorter side repeats (guard rows
    usually outnumber forget rows several times): each distinct forget or retain row is answered
    once and its repeats are copied, so the pass costs forget + retain rows, not twice the longer.
    ``retain_teacher`` answers the retain rows where it is another model than ``teacher`` (a guard
    anchored on the base, without the stack). ``earlier``, a (dataset, cache) pair built by the same
    teachers, lends the rows it already holds: only rows it lacks are answered (a silence round adds a
    few forget rows to a set whose guard rows were all answered before).

    ``needs`` holds "hidden" (forget hidden states), "logprob" (forget sequence log-prob) and/or
    "retain_hidden". Returns (cache, where) or (None, why not): storage is chosen once the first
    batch shows the hidden size and dtype.
    """
    counts = {"hidden": counted_per_row(dataset["labels"])}
    parts = {}  # batch-key prefix -> the teacher that answers it: the forget side "", the retain side "retain_"
    if "retain_hidden" in needs:
        counts["retain_hidden"] = counted_per_row(dataset["retain_labels"])
        parts["retain_"] = retain_teacher or teacher
    if "hidden" in needs or "logprob" in needs:
        # forget side first where it has hidden states: the first output then sizes the whole cache
        parts = {"": teacher, **parts} if "hidden" in needs else {**parts, "": teacher}
    cache = TeacherCache()  # a placeholder until the first output (or the earlier cache) sizes it
    if earlier is not None and (lent := _allocate_like(earlier[1], counts, needs, len(dataset), mode, folder)):
        cache = lent
    for prefix, answer in parts.items():
        first = first_of_each(dataset[f"{prefix}input_ids"], dataset[f"{prefix}labels"])  # (E,)
        distinct = torch.nonzero(first == torch.arange(len(first))).flatten()  # (D,)
        if cache.where and earlier is not None:  # rows the earlier cache holds are copied, not answered
            held, there = _held(dataset, prefix, distinct, *earlier)
            _copy(cache, earlier[1], prefix, distinct[held], there)
            distinct = distinct[~held]
        for start in range(0, len(distinct), batch_size):
            index = distinct[start:start + batch_size]  # (B,)
            batch = {k: v.to(device) for k, v in collate([dataset[int(i)] for i in index]).items()}
            if prefix:
                out = answer(input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"],
                             output_hidden_states=True, logits_to_keep=1)
            else:
                hidden_too = {"output_hidden_states": True} if "hidden" in needs else {}
                keep = {} if "logprob" in needs else {"logits_to_keep": 1}  # NPO reads full logits
                out = answer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **hidden_too, **keep)
            if not cache.where:  # storage decided from the real hidden size and dtype
                like = None if out.hidden_states is None else out.hidden_states[-1]  # (B, T, H)
                sized, where = _empty(counts, needs, len(dataset), like, mode, folder)
                if sized is None:
                    return None, where
                cache = sized
            mask = shift_labels(batch[f"{prefix}labels"]) != IGNORE_INDEX  # (B, T)
            rows = getattr(cache, f"{prefix}hidden")
            if rows is not None:
                rows.write(index, out.hidden_states[-1][mask].cpu())  # (N, H), example by example
            if not prefix and cache.logprob is not None:
                cache.logprob[index] = sequence_logprob(out.logits, batch["labels"]).float().cpu()  # (B,)
        repeats = torch.nonzero(first != torch.arange(len(first))).flatten()  # (R,) rows answered by an earlier one
        if len(repeats):
            rows = getattr(cache, f"{prefix}hidden")
            if rows is not None:
                rows.write(repeats, rows.gather(first[repeats]))
            if not prefix and cache.logprob is not None:
                cache.logprob[repeats] = cache.logprob[first[repeats]]
    return cache, cache.where


def _allocate_like(earlier: TeacherCache, counts: dict[str, torch.Tensor], needs: Collection[str], rows: int, mode: str,
                   folder: Path) -> TeacherCache | None:
    """An empty cache for ``rows`` rows with the earlier cache's parts, width and dtype (None: it has other parts)."""
    parts = [getattr(earlier, key) for key in ("hidden", "retain_hidden") if key in needs]
    if any(part is None for part in parts) or (("logprob" in needs) != (earlier.logprob is not None)):
        return None
    return _empty(counts, needs, rows, parts[0].values if parts else None, mode, folder)[0]


def _empty(counts: dict[str, torch.Tensor], needs: Collection[str], rows: int, like: torch.Tensor | None, mode: str,
           folder: Path) -> tuple[TeacherCache | None, str]:
    """An empty cache for ``rows`` rows in the storage `choose_storage` picks, its hidden parts as wide as ``like``
    (..., H) and of its dtype (None: no hidden part, NPO alone); (None, why) where it fits nowhere."""
    hidden = [key for key in ("hidden", "retain_hidden") if key in needs and like is not None]
    nbytes = (4 * rows if "logprob" in needs else 0) + sum(
        estimate_bytes(counts[key], like.shape[-1], like.element_size()) for key in hidden)
    storage, where = choose_storage(nbytes, mode, folder)
    if storage is None:
        return None, where
    cache = TeacherCache(where=where)
    for key in hidden:
        setattr(cache, key, CachedRows.allocate(counts[key], like.shape[-1], like.dtype, folder if storage == "disk" else None))
    if "logprob" in needs:
        cache.logprob = torch.empty(rows, dtype=torch.float32)
    return cache, where


def _held(dataset: Any, prefix: str, distinct: torch.Tensor, earlier_rows: Any, earlier: TeacherCache,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the ``distinct`` rows the earlier dataset also holds (D,) bool, and where there (H,)."""
    where: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for j, (ids, ys) in enumerate(zip(earlier_rows[f"{prefix}input_ids"], earlier_rows[f"{prefix}labels"])):
        where.setdefault((tuple(ids), tuple(ys)), j)
    ids, ys = dataset[f"{prefix}input_ids"], dataset[f"{prefix}labels"]
    found = [where.get((tuple(ids[int(i)]), tuple(ys[int(i)])), -1) for i in distinct]
    held = torch.tensor([j >= 0 for j in found], dtype=torch.bool)
    return held, torch.tensor([j for j in found if j >= 0], dtype=torch.int64)


def _copy(cache: TeacherCache, earlier: TeacherCache, prefix: str, index: torch.Tensor, there: torch.Tensor) -> None:
    """Copy the earlier cache's rows ``there`` into this cache's rows ``index``."""
    if not len(index):
        return
    rows = getattr(cache, f"{prefix}hidden")
    if rows is not None:
        rows.write(index, getattr(earlier, f"{prefix}hidden").gather(there))
    if not prefix and cache.logprob is not None:
        cache.logprob[index] = earlier.logprob[there]


def first_of_each(input_ids: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """For each row, the index of the first row with the same tokens and labels. -> (E,)

    >>> first_of_each([[1, 2], [3], [1, 2]], [[-100, 2], [3], [-100, 2]]).tolist()
    [0, 1, 0]
    """
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    return torch.tensor([seen.setdefault((tuple(ids), tuple(ys)), i) for i, (ids, ys) in enumerate(zip(input_ids, labels))],
                        dtype=torch.int64)


@dataclass
class IndexedCollator:
    """Wraps a collator so each batch also carries its rows' dataset indices as ``example_index`` (B,).

    >>> collate = IndexedCollator(lambda rows: {"n": torch.tensor([len(r) for r in rows])})
    >>> collate([{"a": 1, INDEX: 7}, {"a": 2, INDEX: 3}])[INDEX].tolist()
    [7, 3]
    """

    inner: Callable[[list[dict]], dict[str, torch.Tensor]]

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        index = [row[INDEX] for row in features] if features and INDEX in features[0] else None
        batch = self.inner([{k: v for k, v in row.items() if k != INDEX} for row in features])
        if index is not None:
            batch[INDEX] = torch.tensor(index, dtype=torch.int64)
        return batch


def teacher_dropout(model: torch.nn.Module, stack: Collection[str]) -> str | None:
    """What makes the teacher (stack on, ``NEW`` off) random in training mode, or None.

    LoRA dropout of a stack adapter, a dropout module of the base, or a dropout rate in the config
    (attention dropout is functional, so only the config shows it). The new adapter's own dropout
    does not matter: the teacher runs without it.
    """
    for name, value in vars(getattr(model, "config", None) or object()).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value > 0:
            return f"the model config's {name}={value}"
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Dropout) and module.p > 0):
            continue
        adapter = name.rsplit(".", 1)[-1] if ".lora_dropout." in name else None
        if adapter is None:
            return f"dropout p={module.p} in the base model ({name.rsplit('.', 2)[-2]})"
        if adapter in stack:
            return f"LoRA dropout p={module.p} on stack adapter {adapter!r}"
    return None
