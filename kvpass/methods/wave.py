"""Wave-index store: retrieval attention over a clustered KV cache (RetroInfer), with optional CPU offload.

Slots of a sequence fall in three parts (the same boundaries for every row and KV head):

    [0, prefix)                      left padding of the batch + `sinks` attention sinks  ┐ the steady zone:
    [prefix, prefix + index.tokens)  clustered into the index (ClusterIndex)              │ exact, on the device
    [.., length)                     the newest tokens, not indexed yet ("recent")        ┘

Prompts attend exactly (everything is still in the steady buffer when a prompt runs). After the call that
brings the sequence to `min_context` tokens, the index is built from everything but the sinks and the last
`recent` tokens; from then on every `update_every` tokens that age out of the recent window are clustered into
the index as a new run. A one-shot store (a forward without a cache) never builds one.
A decode step is tripartite: exact attention over the steady zone, exact attention over the tokens of the top
`retrieval` share of clusters (scored against the query, summed over its GQA group), centroid estimation over
the next `estimation` share, merged by their log-sum-exps (kvpass.kernels.wave_attention).

Layers whose attention hides more than left padding (sliding windows) are never indexed: they stay exact, and
`stats()` says so. A multi-token call after the index exists (a second prompt chunk) attends exactly over the
materialized cache.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from .. import kernels_dispatch
from ..config import WaveIndex
from .base import AttentionSpec, LayerStore
from .rope import stored_rotation
from .wave_buffer import WaveBuffer
from .wave_codes import PreRopeCodes
from .wave_graph import build_graph, search
from .wave_index import ClusterIndex, cluster_run, grow, whitening

_MIN_CAPACITY = 256
GRAPH_QUERIES = 1024   # search "graph": prompt query positions per row the cluster graph is built from


def section_name(method: WaveIndex) -> str:
    """The calibration section of the pre-RoPE query moments (kvpass.calibration.wave writes it)."""
    return "wave-pre-rope"


def budgets(method: WaveIndex, clusters: int) -> tuple[int, int]:
    """(retrieved, estimated) clusters of an index of `clusters` clusters."""
    retrieved = min(clusters, math.ceil(method.retrieval * clusters))
    return retrieved, min(clusters - retrieved, math.ceil(method.estimation * clusters))


class WaveStore(LayerStore):
    """Captured decode (the decode engine's contract, kvpass/methods/base.py) in device mode with the scan search:
    the steady zone is a fixed buffer attended up to the device slot, and the index (cluster count, budgets, the
    tokens it holds) is constant between index runs, which happen on the host after a step (`advance`) and make the
    next `reserve` report the recordings stale, so the engine records the step anew once per `update_every` tokens.
    Offload (host page bookkeeping, a sync per step) and the graph search stay uncaptured."""

    method: WaveIndex
    needs_queries = True   # what a step reads depends on its query: the unfused cache path cannot serve it

    @classmethod
    def supports_captured_decode(cls, method: WaveIndex) -> bool:
        return not method.offload and method.search == "scan"

    def __init__(self, method: WaveIndex, layer: int, capacity: int | None = None, calibration=None):
        super().__init__(method, layer, capacity)
        self._length = 0
        self._prefix = 0            # slots [0, prefix) stay exact: padding + sinks (fixed when the index is built)
        self._k = self._v = None    # steady buffer (B, H, cap, D|Dv): prefix slots, then the unindexed tokens
        self._valid = None          # (B, cap) bool: False for left padding
        self._steady = 0            # slots used in the steady buffer
        self._index: ClusterIndex | None = None
        self._moment = None         # scoring "whitened": (B, H, D, D) fp32 sum of the prompt's q q^T per KV head
        self._codes = None          # scoring "pre-rope": the layer's PreRopeCodes
        self._queries = None        # search "graph": (B, Hq, <= GRAPH_QUERIES, D) sampled prompt queries
        self._graph, self._graph_clusters = None, 0   # the cluster graph, and the index size it was built for
        if method.scoring == "pre-rope":
            if calibration is None:
                raise RuntimeError("WaveIndex(scoring='pre-rope') needs the calibration queries' moments: pass "
                                   "Config(calibration=...) or let kvpass calibrate (kvpass.compile resolves it)")
            tensors = calibration.section(section_name(method))
            self._codes = PreRopeCodes(tensors[f"layers.{layer}.query_moment"], stored_rotation(tensors, layer),
                                       method.rope_window)
        self._buffer: WaveBuffer | None = None
        self.exact_reason: str | None = None   # why this layer never builds an index (None: it does when long enough)
        # Keys read by decode steps, summed over steps, rows and KV heads (host totals; the selected clusters'
        # sizes accumulate on the device in _selected: (retrieved, estimated) int64).
        self._padding = 0           # padding slots of the batch (prefix), summed over rows
        self._selected = None
        self._changed = True        # buffers or the index changed since the last reserve (recordings are stale)
        self.reset_stats()

    @property
    def length(self) -> int:
        return self._length

    @property
    def index(self) -> ClusterIndex | None:
        return self._index

    # -- the LayerStore interface ------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, L, D = k.shape
        if self._k is None:
            cap = max(_MIN_CAPACITY, L, min(self.capacity_hint or 0, self.method.min_context + self.method.update_every))
            self._k = k.new_empty(B, H, cap, D)
            self._v = v.new_empty(B, H, cap, v.shape[-1])
            self._valid = torch.ones(B, cap, dtype=torch.bool, device=k.device)
        elif (B, H, D) != (self._k.shape[0], self._k.shape[1], self._k.shape[3]):
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored (batch, "
                             f"kv heads, head dim); start a new sequence (kvpass.reset(model) or a new kvpass cache)")
        self._k = grow(self._k, 2, self._steady + L)
        self._v = grow(self._v, 2, self._steady + L)
        self._valid = grow(self._valid, 1, self._steady + L, fill=True)
        # Copy, never alias: the caller's tensors may be buffers reused by the next step.
        self._k[:, :, self._steady : self._steady + L] = k
        self._v[:, :, self._steady : self._steady + L] = v
        self._steady += L
        self._length += L

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        Lq = q.shape[2]
        if self._length == Lq:   # the sequence's first call: its mask tells the padding
            self._read_padding(mask, spec)
        if Lq > 1 and self.persistent:
            self._observe_queries(q)
        if self._index is None:
            out = kernels_dispatch.attention(q, self._k[:, :, : self._steady], self._v[:, :, : self._steady], mask=mask,
                                             is_causal=is_causal, scale=spec.scale, softcap=spec.softcap,
                                             window=spec.window)
        elif Lq > 1:
            k, v = self.materialize()
            out = kernels_dispatch.attention(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale,
                                             softcap=spec.softcap, window=spec.window)
        else:
            self._check_mask(mask)
            out = self.tripartite(q, spec)
        if self.persistent:
            # After a prompt this builds the index, so an offloading store moves the prompt's K/V to the host
            # before the next layer fills the GPU with its own.
            self.maintain()
        return out

    def load(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Bulk-load a prompt without attending (benchmarks, probes): append k, v (B, H, L, D|Dv) of real tokens,
        take the second moment of its queries q (B, Hq, L, D) if given, and build the index when due."""
        self.append(k, v)
        if q is not None:
            self._observe_queries(q)
        self.maintain()

    def materialize(self):
        if self._k is None:
            raise RuntimeError(f"layer {self.layer}: the store is empty")
        if self._index is None:
            return self._k[:, :, : self._steady], self._v[:, :, : self._steady]
        B, H, _, D = self._k.shape
        k = self._k.new_zeros(B, H, self._length, D)
        v = self._v.new_zeros(B, H, self._length, self._v.shape[-1])
        k[:, :, : self._prefix] = self._k[:, :, : self._prefix]
        v[:, :, : self._prefix] = self._v[:, :, : self._prefix]
        tail = self._prefix + self._index.tokens
        k[:, :, tail:] = self._k[:, :, self._prefix : self._steady]
        v[:, :, tail:] = self._v[:, :, self._prefix : self._steady]
        self._index.scatter_into(k, v)
        return k, v

    def nbytes(self):
        if self._k is None:
            return {"steady": 0}
        parts = {"steady": self._k.nbytes + self._v.nbytes + self._valid.nbytes}
        if self._index is not None:
            parts.update(self._index.nbytes())
        if self._buffer is not None:
            parts.update(self._buffer.nbytes())
        return parts

    def reset_stats(self) -> None:
        """Zero the keys-read counters (benchmarks time a step many times, then count a fresh sequence of steps)."""
        self._flush_selected()
        self._steady_read = self._retrieved_read = self._estimated_read = self._total_read = 0
        self._scored = self._scorable = 0   # centroids scored to choose the clusters, of those in the index
        self.decode_steps = 0

    def stats(self) -> dict:
        """Per-layer counters for kvpass.report: keys read exactly / estimated / skipped per decode step."""
        row = {"layer": self.layer, "decode_steps": self.decode_steps, "exact_only": self.exact_reason,
               "indexed_tokens": 0 if self._index is None else self._index.tokens,
               "clusters": 0 if self._index is None else self._index.clusters}
        if self.decode_steps:
            self._flush_selected()
            exact, total = self._steady_read + self._retrieved_read, self._total_read
            row.update(keys_exact=exact / total, keys_estimated=self._estimated_read / total,
                       keys_skipped=(total - exact - self._estimated_read) / total,
                       centroids_scored=float(self._scored) / self._scorable)
        if self._buffer is not None:
            row.update(self._buffer.stats())
        return row

    # -- decode ----------------------------------------------------------------------------------------------
    def tripartite(self, q: torch.Tensor, spec: AttentionSpec, new=None) -> torch.Tensor:
        """One decode step's attention over the stored state: q (B, Hq, 1, D) over the steady zone + retrieved
        clusters + estimated clusters; returns (B, Hq, 1, Dv). new: None (the query's own token already appended;
        the steady zone is its first `_steady` slots) or, in a captured step, (slot, k, v): the token's slot in the
        sequence as a (1,) device tensor and its k, v (B, H, 1, D|Dv), which the steady zone's attention writes at
        its steady slot and attends up to it."""
        index = self._index
        C = index.clusters
        scoring = dict(scale=spec.scale, softcap=spec.softcap)
        # The three parts are independent chains of small, latency-bound kernels. Under CUDA-graph capture the steady
        # zone (which needs only q) runs on a side stream beside the scoring and the selection, and the estimation
        # beside the cluster attention; the merge waits for both. Replayed at 128K that saves 6 of 85 us. Launched
        # eagerly the step is bound by the host (about 1 ms), where GPU concurrency cannot help and the switches
        # only add host work (benchmarks/probes/wave_streams.py).
        side = _side_stream(q.device.index) if q.is_cuda and torch.cuda.is_current_stream_capturing() else None
        with _forked(side):
            steady_out, steady_lse = self._steady_attention(q, spec, new, return_lse=True)
        # The scan's selection has its first histogram level counted by the kernel that computes its scores.
        scan_sizes = index.sizes if self.method.search == "scan" else None
        logits, scores, top_level = kernels_dispatch.score_clusters(
            q, index.centroids, C, select_sizes=None if self._codes is not None else scan_sizes, **scoring)
        if self._codes is not None:
            # Pre-RoPE codes choose the clusters, scored by the query rotated to the window distance (wave_codes);
            # estimation keeps the exact logits of the clusters' mean post-RoPE keys.
            position = self._length - 1 if new is None else new[0]
            _, scores, top_level = kernels_dispatch.score_clusters(self._codes.query(q, position), index.codes,
                                                                   C, select_sizes=scan_sizes, **scoring)
        retrieved, estimated = budgets(self.method, C)
        if self._selected is None:   # (captured steps have it from reserve: made here, a replay would zero it)
            self._selected = torch.zeros(2, dtype=torch.int64, device=q.device)
        if self.method.search == "graph":
            top = self._graph_search(q, spec, retrieved + estimated)
            picked = index.sizes.gather(-1, top.long())
            self._selected += torch.stack([picked[..., :retrieved].sum(), picked[..., retrieved:].sum()])
        else:
            # Retrieved then estimated clusters, each in cluster order; empty clusters rank last; their sizes are
            # added to the read counters on the device.
            top = kernels_dispatch.select_clusters(scores, index.sizes, C, retrieved, estimated, self._selected,
                                                   top_level)
            self._scored += C * top.shape[0] * top.shape[1]
        chosen, rest = top[..., :retrieved], top[..., retrieved:]
        ready = None
        if self._buffer is not None:
            host = chosen.to("cpu", non_blocking=True)
            ready = torch.cuda.Event() if q.is_cuda else None
            if ready is not None:
                ready.record()
        # The estimation needs the selection but not the retrieved pages: it runs beside the cluster attention (and
        # the offload's page copies).
        with _forked(side):
            est_out, est_lse = kernels_dispatch.estimate_clusters(logits, index.value_means, index.sizes, rest)
        if self._buffer is None:
            keys, values, table = index.keys, index.values, None
        else:
            if ready is not None:
                ready.synchronize()
            copied = self._buffer.fetch(host.numpy(), ready)
            if copied is not None:
                torch.cuda.current_stream().wait_event(copied)
            keys, values, table = self._buffer.pool_k, self._buffer.pool_v, self._buffer.page_table
        ret_out, ret_lse = kernels_dispatch.cluster_attention(q, keys, values, index.starts, index.sizes, chosen,
                                                              page_table=table, **scoring)
        _join(side, steady_out, steady_lse, est_out, est_lse)
        out = kernels_dispatch.merge_partials([steady_out.permute(2, 0, 1, 3), ret_out, est_out],
                                              [steady_lse.permute(2, 0, 1), ret_lse, est_lse], q.dtype)
        if new is None:   # a captured step is counted by advance(), on the host, for every replay
            self._count()
        return out

    def _steady_attention(self, q, spec: AttentionSpec, new, return_lse: bool):
        """Exact attention of q (B, Hq, 1, D) over the steady zone. new: None (its first `_steady` slots, the
        query's token among them) or (slot, k, v) (see tripartite): then over the whole buffer up to the token's
        steady slot, which the kernel writes k, v into: fixed shapes, the slot read on the device."""
        scoring = dict(scale=spec.scale, softcap=spec.softcap, window=0 if self._index is not None else spec.window)
        if new is None:
            n = self._steady
            return kernels_dispatch.attention(q, self._k[:, :, :n], self._v[:, :, :n], mask=None, is_causal=False,
                                              valid=self._valid[:, :n], return_lse=return_lse, **scoring)
        slot, k, v = new
        # Slots of the sequence past the steady prefix sit `index.tokens` lower in the buffer: the index holds the
        # tokens between. Constant between index runs, each of which makes the engine record the step anew.
        indexed = 0 if self._index is None else self._index.tokens
        return kernels_dispatch.attention(q, self._k, self._v, mask=None, is_causal=True, valid=self._valid,
                                          q_start=slot - indexed if indexed else slot, new_k=k, new_v=v,
                                          return_lse=return_lse, **scoring)

    # -- captured decode (the decode engine) ------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self._k.shape[0]

    @property
    def capacity(self) -> int:
        """Sequence slots the store holds without reallocating: the indexed tokens plus the steady buffer."""
        return (0 if self._index is None else self._index.tokens) + self._k.shape[2]

    @property
    def device(self) -> torch.device:
        return self._k.device

    def reserve(self, length: int) -> bool:
        """Room in the steady buffer for the sequence's slots up to `length`; True if anything a recorded step reads
        was reallocated or changed shape since the last reserve (a new store, growth, an index run). Maintains the
        index first: tokens stored without attending (a benchmark's random fill) are indexed before the step, as a
        prompt's are after its attention."""
        self._maintain_noting_changes()
        needed = self._steady + length - self._length
        if needed > self._k.shape[2]:
            self._k, self._v = grow(self._k, 2, needed), grow(self._v, 2, needed)
            self._valid = grow(self._valid, 1, needed, fill=True)
            self._changed = True
        if self._selected is None:
            self._selected = torch.zeros(2, dtype=torch.int64, device=self._k.device)
        changed, self._changed = self._changed, False
        return changed

    def decode(self, q, k, v, spec: AttentionSpec, slot, valid):
        """Steady-zone attention alone until the index exists (and in layers never indexed), then tripartite; the
        validity of the steady slots is the store's own (its prefix holds the left padding)."""
        if self._index is None:
            return self._steady_attention(q, spec, (slot, k, v), return_lse=False)
        return self.tripartite(q, spec, (slot, k, v))

    def advance(self, count: int) -> None:
        """After `count` captured steps: the tokens are held, counted, and the index maintained (an index run
        changes what the next step reads: the next reserve says so)."""
        for _ in range(count):
            self._length += 1
            self._steady += 1
            if self._index is not None:
                self._count()
            self._maintain_noting_changes()

    def _maintain_noting_changes(self) -> None:
        """maintain(), noting whether the index changed (built or grown by a run): recorded steps then go stale."""
        before = None if self._index is None else self._index.tokens
        self.maintain()
        if self._index is not None and self._index.tokens != before:
            self._changed = True

    def reset(self) -> bool:
        return False   # a new sequence gets new stores (the index is the sequence's); reserve reports them

    def _graph_search(self, q: torch.Tensor, spec: AttentionSpec, want: int) -> torch.Tensor:
        """The `want` best clusters (B, H, want) int32 by a search of the cluster graph (wave_graph), rebuilt from
        the sampled prompt queries whenever the index has grown; clusters the search did not reach are given as
        the index's empty slot `clusters`, which every kernel reads as nothing.

        The logits of every centroid are still computed above for the estimation's weights: this measures what
        the search reads and finds, not yet a step that skips the other centroids."""
        index, C = self._index, self._index.clusters
        centroids, sizes = index.centroids[:, :, :C], index.sizes[:, :, :C]
        if self._graph is None or self._graph_clusters != C:
            if self._queries is None:
                raise RuntimeError(f"layer {self.layer}: WaveIndex(search='graph') builds its graph from the prompt's "
                                   f"queries, and this sequence had no prompt call")
            self._graph = build_graph(centroids, sizes, self._queries, spec.scale, spec.softcap)
            self._graph_clusters = C
        ids, scored = search(self._graph, q, centroids, sizes, spec.scale, spec.softcap, want)
        self._scored = self._scored + scored.sum()   # a device tensor once a search ran: no sync per step
        return ids.masked_fill(ids < 0, C).to(torch.int32)

    def _count(self) -> None:
        """Accumulate the keys this step read exactly / estimated / held. The steady zone's and the index's
        token counts are host numbers; the selected clusters' sizes were added to _selected on the device."""
        B, H = self._k.shape[:2]
        steady_keys = H * (B * self._steady - self._padding)
        self._steady_read += steady_keys
        self._total_read += steady_keys + B * H * self._index.tokens
        self._scorable += B * H * self._index.clusters
        self.decode_steps += 1

    def _flush_selected(self) -> None:
        """Fold the device counters of the selected clusters' sizes into the host totals (a sync: for stats())."""
        if self._selected is not None:
            retrieved, estimated = self._selected.tolist()
            self._retrieved_read += retrieved
            self._estimated_read += estimated
            self._selected.zero_()

    # -- index maintenance --------------------------------------------------------------------------------------
    def _observe_queries(self, q: torch.Tensor) -> None:
        """Keep what the index learns from a prompt's queries (B, Hq, Lq, D): for scoring "whitened" their second
        moment (real slots only) per KV head, for search "graph" a sample of GRAPH_QUERIES evenly spaced real
        positions (all rows share the positions: a padded row's padding slots come first, so the sample is taken
        from the last positions of the prompt, which every row holds)."""
        if self.method.search == "graph":
            real = int(self._valid[:, self._length - q.shape[2] : self._length].sum(-1).min())
            picks = torch.linspace(q.shape[2] - real, q.shape[2] - 1, min(real, GRAPH_QUERIES), device=q.device)
            sample = q[:, :, picks.round().long()]
            self._queries = sample if self._queries is None else torch.cat([self._queries, sample], 2)[
                :, :, -GRAPH_QUERIES:]
        if self.method.scoring != "whitened":
            return
        B, Hq, Lq, D = q.shape
        H = self._k.shape[1]
        real = self._valid[:, self._length - Lq : self._length].to(torch.float32)        # (B, Lq)
        x = (q.float() * real[:, None, :, None]).reshape(B, H, Hq // H * Lq, D)
        moment = x.transpose(-1, -2) @ x
        self._moment = moment if self._moment is None else self._moment + moment

    def _whitening(self):
        """W of the clustering: for "whitened" that of the prompt queries seen so far (None before any prompt: the run
        is then clustered as "centroid"); for "pre-rope" that of the calibration queries; None for "centroid"."""
        if self._codes is not None:
            return self._codes.whitening(self._k.shape[0], self._k.device)
        return None if self._moment is None else whitening(self._moment)

    def _read_padding(self, mask, spec: AttentionSpec) -> None:
        """From the sequence's first call: which slots are left padding, and whether this layer can be indexed."""
        if spec.window:
            self.exact_reason = f"sliding window of {spec.window} tokens"
            return
        if mask is None:
            return
        seen = mask[:, 0, -1, : self._length].expand(self._k.shape[0], -1)   # what the last query sees
        first = seen.float().argmax(dim=-1)                                    # first visible slot per row
        slots = torch.arange(self._length, device=seen.device)
        if not bool((seen == (slots >= first[:, None])).all()):
            self.exact_reason = "the mask hides more than left padding (a sliding window or packed sequences)"
            return
        self._valid[:, : self._length] = seen

    def _check_mask(self, mask) -> None:
        """A decode mask must show exactly the non-padding slots (checked where it is free: on the CPU)."""
        if mask is None or mask.is_cuda:
            return
        if not bool((mask[:, 0, -1, : self._length] == self._slot_valid()).all()):
            raise RuntimeError(f"layer {self.layer}: the decode mask hides slots other than the prompt's left padding; "
                               f"the wave index cannot serve it (sliding window or a changed padding)")

    def _slot_valid(self) -> torch.Tensor:
        """(B, length) bool validity of every slot of the sequence."""
        valid = torch.ones(self._valid.shape[0], self._length, dtype=torch.bool, device=self._valid.device)
        valid[:, : self._prefix] = self._valid[:, : self._prefix]
        if self._index is None:
            valid[:, : self._steady] = self._valid[:, : self._steady]
        return valid

    def maintain(self) -> None:
        """Build the index once the sequence is long enough; cluster tokens that aged out of the recent window.
        Every call of a sequence's store runs it after attending; a bulk loader (benchmarks) calls it after
        append()."""
        method = self.method
        if self.exact_reason is not None:
            return
        if self._index is None:
            if self._length < method.min_context:
                return
            padding = (~self._valid[:, : self._steady]).sum(-1)
            self._padding = int(padding.sum())
            if self._codes is not None:
                self._codes.offsets = padding
            self._prefix = int(padding.max()) + method.sinks
            if self._steady - self._prefix - method.recent < method.cluster_size:
                return
            self._index = ClusterIndex(method, self._k, self._v, self._index_capacity(), host=method.offload,
                                       codes=self._codes is not None)
            self._index_run(self._steady - self._prefix - method.recent)
            if method.offload:
                self._buffer = WaveBuffer(self._index, self._buffer_slots(), self._k.device)
        elif self._steady - self._prefix - method.recent >= method.update_every:
            self._index_run(method.update_every)

    def _index_run(self, n: int) -> None:
        """Cluster the n oldest unindexed tokens into the index and drop them from the steady buffer."""
        start = self._prefix
        k, v = self._k[:, :, start : start + n], self._v[:, :, start : start + n]
        first_slot = self._prefix + self._index.tokens
        codes = None if self._codes is None else self._codes.keys(k, first_slot)   # pre-RoPE: clustered instead
        self._index.add(cluster_run(k, v, self.method, self._whitening(), codes=codes), k, v, first_slot)
        keep = self._steady - start - n
        self._k[:, :, start : start + keep] = self._k[:, :, start + n : self._steady].clone()
        self._v[:, :, start : start + keep] = self._v[:, :, start + n : self._steady].clone()
        self._steady = start + keep
        room = self._steady + self.method.update_every + _MIN_CAPACITY
        if self._k.shape[2] > 2 * room:   # the prompt has moved into the index: give its steady room back
            self._k, self._v = self._k[:, :, :room].clone(), self._v[:, :, :room].clone()
            self._valid = self._valid[:, :room].clone()

    def _index_capacity(self) -> int:
        expected = max(self._length, self.capacity_hint or 0)
        return expected - self.method.sinks

    def _buffer_slots(self) -> int:
        """Pages of the GPU wave buffer: `buffer` of the indexed rows, at least one step's worth of retrieval."""
        index = self._index
        B, H = index.keys.shape[:2]
        pages = B * H * math.ceil(self._index_capacity() / index.page)
        retrieved, _ = budgets(self.method, max(1, math.ceil(self._index_capacity() / self.method.cluster_size)))
        return max(math.ceil(self.method.buffer * pages), 2 * B * H * retrieved)


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """One side stream per GPU for the decode step's independent attention parts (layers run one at a time)."""
    return torch.cuda.Stream(device_index)


@contextlib.contextmanager
def _forked(side: torch.cuda.Stream | None):
    """Run the block on `side` after what the current stream has queued (nothing changes when side is None)."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield


def _join(side: torch.cuda.Stream | None, *made_on_side: torch.Tensor) -> None:
    """Make the current stream wait for `side`, and keep the memory of the tensors made there from being reused
    by `side` before the current stream has read them."""
    if side is None:
        return
    current = torch.cuda.current_stream()
    current.wait_stream(side)
    for t in made_on_side:
        t.record_stream(current)
