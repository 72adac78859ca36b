"""Building blocks of the wave index: clustering a run of tokens by segmented k-means, and the clustered,
cluster-contiguous storage the retrieval kernels read.

A run of n tokens per (row, KV head) is cut into near-equal segments of at most `segment` tokens; each segment
is clustered on its own (k-means cost grows with tokens x clusters, so segments keep it linear in the context)
into about `cluster_size` tokens per cluster, by inner product against normalized centroids on keys centred by
the run's mean key (RetroInfer: centring removes the component every key shares, which would otherwise pull
every key toward the same cluster), or with `scoring="whitened"` by Euclidean distance after whitening by the
queries' second moment. Only the assignment uses the transformed keys: the stored centroid is the mean of the
cluster's real keys, which is what scoring and estimation need.
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import torch

from .. import kernels_dispatch
from ..config import WaveIndex


@dataclasses.dataclass
class ClusteredRun:
    """n tokens per (row, KV head) grouped into C clusters (the same n and C for every row and head).

    centroids (B, H, C, D) and value_means (B, H, C, Dv) in the keys' dtype; sizes (B, H, C) int32;
    starts (B, H, C) int32: first position of each cluster in `order`; order (B, H, n) int64: the run's token
    indices sorted by cluster (cluster c holds order[starts[c] : starts[c] + sizes[c]]); codes (B, H, C, D):
    the mean of the points the run was clustered on when they are not the keys (pre-RoPE codes), else None.
    """

    centroids: torch.Tensor
    value_means: torch.Tensor
    sizes: torch.Tensor
    starts: torch.Tensor
    order: torch.Tensor
    codes: torch.Tensor | None = None


def segments(n: int, method: WaveIndex) -> tuple[int, int, int]:
    """(segments, tokens per segment (the last may be shorter), clusters per segment) for a run of n tokens."""
    count = math.ceil(n / method.segment)
    length = math.ceil(n / count)
    return count, length, max(1, round(length / method.cluster_size))


def whitening(moment: torch.Tensor) -> torch.Tensor:
    """W (B, H, D, D) with ||(k - c) W||^2 = (k - c)^T M (k - c) = E_q[(q . (k - c))^2] for the queries' second
    moment M (B, H, D, D): the Cholesky factor of M, regularized so that directions no query used still count
    a little (1e-3 of the mean eigenvalue)."""
    D = moment.shape[-1]
    ridge = 1e-3 * moment.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    return torch.linalg.cholesky(moment + ridge * torch.eye(D, device=moment.device))


def cluster_run(k: torch.Tensor, v: torch.Tensor, method: WaveIndex, whiten: torch.Tensor | None = None,
                codes: torch.Tensor | None = None) -> ClusteredRun:
    """Cluster the tokens k (B, H, n, D), v (B, H, n, Dv) (all real tokens, no padding) by segmented k-means.

    whiten: None (RetroInfer: spherical k-means of the centred keys) or W (B, H, D, D) from `whitening`:
    Euclidean k-means of the keys times W, so a cluster gathers keys that the queries score alike.
    codes: (B, H, n, D) points to cluster instead of the keys (pre-RoPE keys); their means become the run's codes."""
    B, H, n, D = k.shape
    count, length, per_segment = segments(n, method)
    keys = (k if codes is None else codes).float()
    if whiten is None:
        points, metric = keys - keys.mean(dim=2, keepdim=True), "ip"
    else:
        points, metric = keys @ whiten, "l2"
    # (B * H * count, length, D) groups; the last segment's missing rows are zeros beyond its valid count.
    padded = torch.nn.functional.pad(points, (0, 0, 0, count * length - n)).view(B * H * count, length, D)
    valid = torch.full((count,), length, dtype=torch.int32, device=k.device)
    valid[-1] = n - (count - 1) * length
    labels, _, _ = kernels_dispatch.kmeans(padded, valid.repeat(B * H), per_segment, method.iterations, metric)
    # Cluster ids across the run: segment s owns clusters [s * per_segment, (s + 1) * per_segment).
    offsets = torch.arange(count, device=k.device, dtype=torch.int64)[:, None] * per_segment
    labels = (labels.view(B, H, count, length).long() + offsets).view(B, H, count * length)[:, :, :n]
    C = count * per_segment
    order = torch.argsort(labels, dim=-1, stable=True)
    # Means through the deterministic sums of the k-means update step: the same keys always give the same
    # index (torch's scatter_add on a GPU adds in no fixed order). Keys and values share one sort.
    parts = [k, v.to(k.dtype)] + ([] if codes is None else [codes.to(k.dtype)])
    rows = torch.cat(parts, dim=-1).reshape(B * H, n, -1)
    sums, sizes = kernels_dispatch.cluster_sums(rows, labels.view(B * H, n), C)
    means = (sums / sizes.clamp_min(1)[..., None].float()).reshape(B, H, C, -1)
    sizes = sizes.view(B, H, C)
    starts = torch.cumsum(sizes, dim=-1, dtype=torch.int32) - sizes
    Dv = v.shape[-1]
    return ClusteredRun(centroids=means[..., :D].to(k.dtype), value_means=means[..., D : D + Dv].to(v.dtype),
                        sizes=sizes, starts=starts, order=order,
                        codes=None if codes is None else means[..., D + Dv :].to(k.dtype))


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in page-locked memory, registered with CUDA in place (cudaHostRegister).

    torch.empty(pin_memory=True) goes through PyTorch's caching host allocator, which rounds every block up to a
    power of two: 2.7 GB of one layer's K/V took 4 GB, and a 655K-token, 32-layer cache ran the host out of
    memory. The registration is undone when the returned tensor is collected (the index keeps it whole and only
    takes short-lived views of it)."""
    tensor = torch.empty(shape, dtype=dtype)
    if tensor.numel():
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0)
        if int(status) != 0:
            raise RuntimeError(f"cudaHostRegister of {tensor.nbytes / 2**30:.2f} GiB failed ({status})")
        weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor


def grow(tensor: torch.Tensor | None, dim: int, needed: int, *, fill=None, pin: bool = False) -> torch.Tensor:
    """`tensor` with room for `needed` entries along `dim` (contents kept), grown to at least twice its size
    so a sequence that keeps growing pays O(log n) copies."""
    if needed <= tensor.shape[dim]:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = max(needed, 2 * shape[dim])
    new = pinned_empty(shape, tensor.dtype) if pin else torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    if fill is not None:
        new.fill_(fill)
    new.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return new


class ClusterIndex:
    """The indexed tokens of one layer: cluster tables on the compute device, K/V in cluster-contiguous order.

    Each clustered run is appended after the previous ones, its token rows starting on a page boundary so that a
    page of the K/V never mixes runs (a cached page never goes stale). On the device: centroids (B, H, Ccap, D),
    value_means (B, H, Ccap, Dv), sizes and starts (B, H, Ccap) int32 (a cluster's rows in `keys`), with `codes`
    the clusters' codes (B, H, Ccap, D) that decode steps score instead of the centroids (else None). `keys`,
    `values` (B, H, Ncap, D|Dv) live on the device, or with `host` in CPU memory (pinned when the device is a
    GPU); `slots` (B, H, Ncap) int64 on the device: each stored row's slot in the sequence.
    """

    def __init__(self, method: WaveIndex, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int, host: bool,
                 codes: bool = False):
        B, H, _, D = like_k.shape
        self.method, self.host = method, host
        self.page = method.page
        self.clusters = 0            # clusters in use (the same count for every row and head)
        self.rows = 0                # K/V rows in use, page-aligned per run
        self.tokens = 0              # real tokens indexed (rows minus each run's page padding)
        self._runs: list[tuple[int, int]] = []   # (first row, tokens) of each run
        device, dtype = like_k.device, like_k.dtype
        store = torch.device("cpu") if host else device
        self._pin = host and device.type == "cuda"
        pages = math.ceil(capacity / self.page) + 1
        clusters = max(1, math.ceil(capacity / method.cluster_size))
        self.centroids = torch.zeros(B, H, clusters, D, dtype=dtype, device=device)
        self.codes = torch.zeros(B, H, clusters, D, dtype=dtype, device=device) if codes else None
        self.value_means = torch.zeros(B, H, clusters, like_v.shape[-1], dtype=like_v.dtype, device=device)
        self.sizes = torch.zeros(B, H, clusters, dtype=torch.int32, device=device)
        self.starts = torch.zeros(B, H, clusters, dtype=torch.int32, device=device)
        self.slots = torch.zeros(B, H, pages * self.page, dtype=torch.int64, device=device)
        try:
            shapes = ((B, H, pages * self.page, D), (B, H, pages * self.page, like_v.shape[-1]))
            if self._pin:
                self.keys, self.values = (pinned_empty(shape, t.dtype) for shape, t in zip(shapes, (like_k, like_v)))
            else:
                self.keys, self.values = (torch.empty(shape, dtype=t.dtype, device=store)
                                          for shape, t in zip(shapes, (like_k, like_v)))
        except RuntimeError as error:
            size = B * H * pages * self.page * (D + like_v.shape[-1]) * like_k.element_size()
            raise RuntimeError(f"the wave index could not allocate {size / 2**30:.2f} GiB of "
                               f"{'pinned CPU' if self._pin else store.type} memory for the K/V of its clusters "
                               f"({error}); shorten the context, or set WaveIndex(offload=False) to keep them on the "
                               f"GPU") from error
        # Host copies of the cluster tables, for the wave buffer's page bookkeeping (offload only).
        self.host_starts = self.host_sizes = None

    @property
    def pages(self) -> int:
        """Pages of K/V rows per (row, head) in use."""
        return self.rows // self.page

    def add(self, run: ClusteredRun, k: torch.Tensor, v: torch.Tensor, first_slot: int) -> None:
        """Append a clustered run of the tokens k (B, H, n, D), v at sequence slots first_slot .. first_slot + n."""
        n, c = k.shape[2], run.sizes.shape[-1]
        base, rows = self.rows, math.ceil(n / self.page) * self.page
        self.keys = grow(self.keys, 2, base + rows, pin=self._pin)
        self.values = grow(self.values, 2, base + rows, pin=self._pin)
        self.slots = grow(self.slots, 2, base + rows)
        for name in ("centroids", "value_means", "sizes", "starts") + (("codes",) if self.codes is not None else ()):
            # + 1: slot `clusters` always exists and is empty, the stand-in for "no cluster" (graph search)
            setattr(self, name, grow(getattr(self, name), 2, self.clusters + c + 1, fill=0))
        order = run.order
        self.keys[:, :, base : base + n] = k.gather(2, order[..., None].expand_as(k)).to(self.keys.device)
        self.values[:, :, base : base + n] = v.gather(2, order[..., None].expand_as(v)).to(self.values.device)
        self.slots[:, :, base : base + n] = first_slot + order
        span = slice(self.clusters, self.clusters + c)
        self.centroids[:, :, span] = run.centroids
        if self.codes is not None:
            self.codes[:, :, span] = run.codes
        self.value_means[:, :, span] = run.value_means
        self.sizes[:, :, span] = run.sizes
        self.starts[:, :, span] = run.starts + base
        self._runs.append((base, n))
        self.clusters += c
        self.rows += rows
        self.tokens += n
        if self.host:
            self.host_starts = self.starts[:, :, : self.clusters].cpu().numpy()
            self.host_sizes = self.sizes[:, :, : self.clusters].cpu().numpy()

    def scatter_into(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the indexed tokens into their sequence slots of the dense k (B, H, length, D), v (in place)."""
        slots = self.slots[:, :, : self.rows]
        # Rows past a run's last token are page padding (the same rows for every row and head).
        used = torch.zeros(self.rows, dtype=torch.bool)
        for base, n in self._runs:
            used[base : base + n] = True
        keys = self.keys[:, :, : self.rows][:, :, used.to(self.keys.device)].to(k.device)
        values = self.values[:, :, : self.rows][:, :, used.to(self.values.device)].to(v.device)
        index = slots[:, :, used.to(slots.device)]
        k.scatter_(2, index[..., None].expand(*index.shape, k.shape[-1]), keys.to(k.dtype))
        v.scatter_(2, index[..., None].expand(*index.shape, v.shape[-1]), values.to(v.dtype))

    def nbytes(self) -> dict[str, int]:
        tables = (self.centroids, self.codes, self.value_means, self.sizes, self.starts, self.slots)
        device = sum(t.nbytes for t in tables if t is not None)
        return {"index": device, "clustered_kv_host" if self.host else "clustered_kv": self.keys.nbytes +
                self.values.nbytes}
