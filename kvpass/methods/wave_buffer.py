"""The wave buffer: a GPU cache of pages of an offloaded wave index (RetroInfer), least recently used out.

The full clustered K/V of a layer sits in CPU memory (`ClusterIndex(host=True)`); the buffer holds `slots`
pages of it on the device. Each decode step names the clusters it will attend exactly; `fetch` maps their pages
to slots, copies the missing ones host -> device on a side stream, and returns the event the attention kernel's
stream must wait for, so the copies overlap whatever the step launches in between (the steady-zone attention
and the centroid estimation). The bookkeeping runs on the host (numpy): the step's selection is already there,
the page table it produces goes to the device in one small copy.

Eviction picks the least recently used slots among those the current step does not need; a step that needs
more pages than the buffer holds raises before any state changes, naming the knob (`WaveIndex(buffer=...)`).
"""
from __future__ import annotations

import numpy as np
import torch

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
        self._staging_k = self._staging_v = None

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
        index, page = self.index, self.index.page
        B, H = self.page_table.shape[:2]
        flat_k = index.keys.view(B * H * (index.keys.shape[2] // page), page, -1)
        flat_v = index.values.view(B * H * (index.values.shape[2] // page), page, -1)
        # Page key bh * Pcap + page indexes the flattened pages directly (Pcap = pages per (row, head)).
        rows = torch.from_numpy(missing)
        slots = torch.from_numpy(victims)
        table_update = torch.from_numpy(victims.astype(np.int32))
        if self._stream is None:
            self.pool_k[slots] = flat_k[rows]
            self.pool_v[slots] = flat_v[rows]
            self.page_table.view(-1)[rows] = table_update
            return None
        m = len(missing)
        if self._staging_k is None or self._staging_k.shape[0] < m:
            self._staging_k = torch.empty((max(m, self.slots // 4),) + flat_k.shape[1:], dtype=flat_k.dtype,
                                          pin_memory=True)
            self._staging_v = torch.empty((self._staging_k.shape[0],) + flat_v.shape[1:], dtype=flat_v.dtype,
                                          pin_memory=True)
        torch.index_select(flat_k, 0, rows, out=self._staging_k[:m])
        torch.index_select(flat_v, 0, rows, out=self._staging_v[:m])
        with torch.cuda.stream(self._stream):
            if after is not None:
                self._stream.wait_event(after)
            dst = slots.to(self.device, non_blocking=True)
            self.pool_k.index_copy_(0, dst, self._staging_k[:m].to(self.device, non_blocking=True))
            self.pool_v.index_copy_(0, dst, self._staging_v[:m].to(self.device, non_blocking=True))
            self.page_table.view(-1).index_copy_(0, rows.to(self.device, non_blocking=True),
                                                 table_update.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self._stream)
        return done

    def nbytes(self) -> dict[str, int]:
        return {"wave_buffer": self.pool_k.nbytes + self.pool_v.nbytes + self.page_table.nbytes}

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"pages_hit": self.hits, "pages_missed": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "slots": self.slots}
