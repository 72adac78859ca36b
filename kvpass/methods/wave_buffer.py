"""The wave buffer: a GPU cache of pages of an offloaded wave index (RetroInfer), least recently used out.

The full clustered K/V of a layer sits in CPU memory (`ClusterIndex(host=True)`); the buffer holds `slots`
pages of it on the device. Each decode step names the clusters it will attend exactly; `fetch` maps their pages
to slots and moves the missing ones into the pool with one kernel on a side stream (kvpass.kernels.page_copy: it
reads the pages and the list of moves straight from pinned host memory, and writes the page table), then returns
the event the attention kernel's stream must wait for, so the copy overlaps whatever the step launches in between
(the estimation). The bookkeeping runs on the host (numpy): the step's selection is already there.

Eviction picks the least recently used slots among those the current step does not need; a step that needs
more pages than the buffer holds raises before any state changes, naming the knob (`WaveIndex(buffer=...)`).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels_dispatch
from .wave_index import ClusterIndex


def _smallest(values: np.ndarray, m: int) -> np.ndarray:
    """A stable argsort's first m positions (the m smallest values in order, ties to the lower position) without
    sorting all n: a partition finds the m-th value, then only the positions below it are sorted."""
    if m <= 0 or m >= len(values):
        return np.argsort(values, kind="stable")[:max(m, 0)]
    cut = np.partition(values, m - 1)[m - 1]
    below = np.flatnonzero(values < cut)
    below = below[np.argsort(values[below], kind="stable")]
    return np.concatenate([below, np.flatnonzero(values == cut)[: m - len(below)]])


class WaveBuffer:
    """Device pool of `slots` pages for one layer's offloaded index.

    pool_k (slots, page, D), pool_v (slots, page, Dv) on the device; page_table (B, H, Pcap) int32 on the
    device: the slot of each (row, head, page) this step reads (other entries are stale or -1).
    Counters: hits, misses (pages), steps.
    """

    def __init__(self, index: ClusterIndex, slots: int, device: torch.device):
        B, H, _, D = index.keys.shape
        self.index, self.slots, self.device = index, slots, device
        self.pool_k = torch.empty(slots, index.page, D, dtype=index.keys.dtype, device=device)
        self.pool_v = torch.empty(slots, index.page, index.values.shape[-1], dtype=index.values.dtype, device=device)
        self.page_table = torch.full((B, H, index.keys.shape[2] // index.page), -1, dtype=torch.int32, device=device)
        self._slot_of = np.full((B * H, self.page_table.shape[-1]), -1, dtype=np.int64)   # page -> slot
        self._marks = np.zeros(self._slot_of.shape, dtype=bool)   # scratch of pages_of, all False between calls
        self._owner = np.full(slots, -1, dtype=np.int64)         # slot -> flat page key (bh * Pcap + page)
        self._last_used = np.zeros(slots, dtype=np.int64)        # step that last read the slot (0 = never)
        self.hits = self.misses = self.steps = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._moves = None      # pinned (n, 2) int64: the (page, slot) rows the copy kernel reads
        self._reading = None    # (event, host tensors) of the copy in flight

    def _grow_table(self) -> None:
        """Follow the index when it grows (new runs add pages)."""
        pages = self.index.keys.shape[2] // self.index.page
        if pages > self.page_table.shape[-1]:
            B, H, old = self.page_table.shape
            table = torch.full((B, H, pages), -1, dtype=torch.int32, device=self.device)
            table[:, :, :old] = self.page_table
            self.page_table = table
            slot_of = np.full((B * H, pages), -1, dtype=np.int64)
            slot_of[:, :old] = self._slot_of
            self._owner = np.where(self._owner >= 0, (self._owner // old) * pages + self._owner % old, -1)
            self._slot_of = slot_of
            self._marks = np.zeros(slot_of.shape, dtype=bool)

    def pages_of(self, clusters: np.ndarray) -> np.ndarray:
        """Unique flat page keys (bh * Pcap + page), ascending, holding the tokens of clusters (B, H, r) (cluster
        ids)."""
        B, H, r = clusters.shape
        per_row = self.index.host_starts.shape[-1]
        flat = (clusters.reshape(B * H, r) + np.arange(0, B * H * per_row, per_row)[:, None]).ravel()
        starts = self.index.host_starts.ravel()[flat].astype(np.int64)
        sizes = self.index.host_sizes.ravel()[flat]
        page = self.index.page
        first = starts // page
        count = np.where(sizes > 0, (starts + sizes - 1) // page - first + 1, 0)
        total = int(count.sum())
        owner = np.repeat(np.arange(B * H * r), count)                     # (total,) which (bh, cluster)
        within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        keys = (owner // r) * self._slot_of.shape[-1] + first[owner] + within
        # Dedupe by marking a table of every page rather than np.unique (a sort or hash of the keys took a third
        # of the step's host time at 512K).
        mark = self._marks.reshape(-1)
        mark[keys] = True
        needed = np.flatnonzero(mark)
        mark[needed] = False
        return needed

    def fetch(self, clusters: np.ndarray, after: torch.cuda.Event | None) -> torch.cuda.Event | None:
        """Make the pages of clusters (B, H, r) resident; returns the event the reading stream must wait for
        (None on CPU, where copies are synchronous). after: an event recorded on the compute stream once the
        previous reads of this buffer were issued (copies into evicted slots must not overtake them)."""
        self._grow_table()
        needed = self.pages_of(clusters)
        slot = self._slot_of.reshape(-1)[needed]
        hit = slot >= 0
        missing = needed[~hit]
        free = self.slots - int(hit.sum())
        if len(missing) > free:
            raise ValueError(f"the wave buffer holds {self.slots} pages but this step needs {len(needed)} "
                             f"({len(missing)} not resident); raise WaveIndex(buffer=...) (the share of indexed tokens "
                             f"kept on the GPU) or lower WaveIndex(retrieval=...)")
        self.steps += 1
        self.hits += int(hit.sum())
        self.misses += len(missing)
        self._last_used[slot[hit]] = self.steps
        if not len(missing):
            return None
        # Least recently used slots that this step does not read (a hit was just stamped with this step): a
        # partition, not a sort of every slot; among equally old slots it picks the lowest.
        candidates = np.flatnonzero(self._last_used < self.steps)
        victims = candidates[_smallest(self._last_used[candidates], len(missing))]
        evicted = self._owner[victims]
        self._slot_of.reshape(-1)[evicted[evicted >= 0]] = -1
        self._slot_of.reshape(-1)[missing] = victims
        self._owner[victims] = missing
        self._last_used[victims] = self.steps
        return self._copy(missing, victims, after)

    def _copy(self, missing: np.ndarray, victims: np.ndarray, after) -> torch.cuda.Event | None:
        """Move the pages `missing` (flat page keys) into the slots `victims` and record them in the page table. On a
        GPU the copy kernel runs on the side stream and reads the pages and the move list straight from pinned
        host memory; returns the event that marks its end (None on the CPU)."""
        index, page = self.index, self.index.page
        B, H = self.page_table.shape[:2]
        # Page key bh * Pcap + page indexes the flattened pages directly (Pcap = pages per (row, head)).
        flat_k = index.keys.view(B * H * (index.keys.shape[2] // page), page, -1)
        flat_v = index.values.view(B * H * (index.values.shape[2] // page), page, -1)
        table = self.page_table.view(-1)
        if self._stream is None:
            moves = torch.from_numpy(np.stack([missing, victims], axis=1))
            kernels_dispatch.copy_pages(flat_k, flat_v, self.pool_k, self.pool_v, table, moves)
            return None
        # The previous copy read its move list and the host pages until its event: wait for it before the list is
        # rewritten and before letting go of those pages (the index may have grown into new host tensors since).
        if self._reading is not None:
            self._reading[0].synchronize()
        m = len(missing)
        if self._moves is None or self._moves.shape[0] < m:
            self._moves = torch.empty((max(m, self.slots // 4), 2), dtype=torch.int64, pin_memory=True)
        moves = self._moves[:m]
        moves.numpy()[:, 0] = missing
        moves.numpy()[:, 1] = victims
        with torch.cuda.stream(self._stream):
            if after is not None:
                self._stream.wait_event(after)
            kernels_dispatch.copy_pages(flat_k, flat_v, self.pool_k, self.pool_v, table, moves)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._reading = (done, flat_k, flat_v)
        return done

    def nbytes(self) -> dict[str, int]:
        return {"wave_buffer": self.pool_k.nbytes + self.pool_v.nbytes + self.page_table.nbytes}

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"pages_hit": self.hits, "pages_missed": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "slots": self.slots}
