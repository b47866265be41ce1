"""The layer memo: every compressed layer a population needs, computed once.

A compressed layer depends only on ``(layer, n_pruned, bits, quantizer)`` (its *gene*), so its
dense student weight and its coded-size estimate are kept in a bounded LRU. What every gene
of one ``(layer, n_pruned)`` shares, the survivors' fine histogram (``quantize.
FineHistogram``), is kept in a second LRU: any bit-width and either quantizer then costs a
few operations on 2**16 bins plus one table lookup per weight. The survivors are a rank
compare (``rank >= n_pruned``, never a sort) and each weight's fine bin on the layer's range
is computed once. The students are those of ``apply`` bit for bit: the same quantizer
functions on the same histograms (survivors in row-major order).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from moecomp import outputs as outputs_mod
from moecomp.codec.masks import grid_of
from moecomp.errors import ConfigError
from moecomp.evaluate.size import layer_coded_bytes, mask_coded_bytes
from moecomp.quantize import (
    FINE_BINS,
    FineHistogram,
    fine_histogram_from,
    fine_index,
    kmeans_levels,
    shared_quantize,
    uniform_levels,
)
from moecomp.target import Target

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A dict bounded by the memory its values hold, least recently used evicted first.

    ``measure(value) -> (block, nbytes)``: the memory block a value lives in and its size.
    Values may share a block (rows of one batch output): a block counts once, and its bytes
    are released when its last value is evicted, so ``used`` is the memory really held.
    """

    def __init__(self, capacity: float, measure: Callable[[V], tuple[Hashable, int]]) -> None:
        self.capacity = capacity
        self._measure = measure
        self._data: OrderedDict[K, tuple[V, Hashable]] = OrderedDict()
        self._blocks: dict[Hashable, list[int]] = {}  # block -> [values in it, nbytes]
        self.used = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return item[0]

    def peek(self, key: K) -> V | None:
        """The value of ``key`` without counting a hit or a miss or refreshing it."""
        item = self._data.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V) -> None:
        block, nbytes = self._measure(value)
        if nbytes > self.capacity:
            return
        if key in self._data:
            self._release(self._data.pop(key)[1])
        self._data[key] = (value, block)
        entry = self._blocks.get(block)
        if entry is None:
            self._blocks[block] = [1, nbytes]
            self.used += nbytes
        else:
            entry[0] += 1
        while self.used > self.capacity:
            _, (_, old) = self._data.popitem(last=False)
            self._release(old)

    def _release(self, block: Hashable) -> None:
        entry = self._blocks[block]
        entry[0] -= 1
        if entry[0] == 0:
            self.used -= entry[1]
            del self._blocks[block]

    def clear(self) -> None:
        self._data.clear()
        self._blocks.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._data)


def storage(t: Any) -> tuple[Hashable, int]:
    """The memory block of a tensor (its storage, shared by views) and its bytes; for a
    structured output, the blocks of all its tensors together."""
    if not isinstance(t, torch.Tensor):
        parts = [storage(x) for x in outputs_mod.tensors(t)]
        return tuple(b for b, _ in parts), sum(n for _, n in parts)
    st = t.untyped_storage()
    return (t.device, st.data_ptr()), st.nbytes()


@dataclass(frozen=True)
class LayerEntry:
    """A compressed layer as the evaluator needs it: the dense student weight (teacher's
    dtype and device; row ``row`` of ``block``, the weights computed in one batch), how many
    weights survive and the estimated coded bytes."""

    block: torch.Tensor
    row: int
    n_kept: int
    coded_bytes: int

    @property
    def weight(self) -> torch.Tensor:
        return self.block[self.row]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# A layer's gene: (quantizer, n_pruned, bits or shared K, shared group). The shared group is
# ((layer, n_pruned), ...) of every layer pooled with it, () for single-tensor quantizers: a
# pooled codebook depends on all of them, so they are all part of each member's gene.
Gene = tuple[str, int, int, tuple[tuple[int, int], ...]]
_LEVELS: dict[str, Callable[[FineHistogram, int], tuple[np.ndarray, np.ndarray]]] = {
    "uniform": uniform_levels,
    "kmeans": kmeans_levels,
}


@dataclass(frozen=True)
class Survivors:
    """What every gene of one ``(layer, n_pruned)`` shares: the fine histogram of the
    survivors (``quantize.FineHistogram``) and, when their range is not the whole layer's,
    the fine bin of every weight on their own grid (uint16 ``(numel,)``; None: the layer's
    precomputed one applies)."""

    hist: FineHistogram
    index: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.hist.nbytes + (0 if self.index is None else int(self.index.nbytes))


class LayerBank:
    """The compressed layers of one target (``target.layers`` order, index ``j``).

    ranks: name -> int64 rank tensor of each layer's shape (rank 0 pruned first);
    tensors: the teacher's tensors as students start from (dense ones rounded);
    memo_mb: bound of the memo of dense student weights (0: nothing kept);
    survivors_mb: bound of the per-``(layer, n_pruned)`` survivor histograms (0: none kept);
    device: where the dense student weights are put (they are computed on the CPU).
    """

    def __init__(self, target: Target, ranks: dict[str, torch.Tensor],
                 tensors: dict[str, torch.Tensor], *, memo_mb: float,
                 survivors_mb: float | None = None,
                 device: torch.device | str = "cpu") -> None:
        self._names = target.layer_names
        self._numel = [ref.numel for ref in target.layers]
        self._shapes = [tuple(ref.shape) for ref in target.layers]
        self._tensors = tensors
        self._device = torch.device(device)
        self._mask_cache: dict[tuple[int, int], int | None] = {}
        self._rank: list[np.ndarray] = []     # flat ranks: the mask of n_pruned p is rank >= p
        self._w: list[np.ndarray] = []        # flat float32 weights (CPU)
        self._range: list[tuple[float, float]] = []   # the layer's min and max
        self._extreme_rank: list[int] = []    # the extremes survive while n_pruned <= this
        self._fine: list[np.ndarray] = []     # fine bin of every weight on the layer's grid
        for ref in target.layers:
            r = ranks.get(ref.name)
            if r is None:
                raise ConfigError(
                    "ranks",
                    f"no rank tensor for layer {ref.name!r}; needed for "
                    f"every layer of target.layers: {', '.join(self._names)}",
                )
            if tuple(r.shape) != ref.shape or r.dtype != torch.int64:
                raise ConfigError(
                    f"ranks.{ref.name}",
                    f"must be an int64 tensor of shape {ref.shape}, got {r.dtype} {tuple(r.shape)}",
                )
            flat = r.reshape(-1).cpu()
            if ref.numel and (
                int(flat.min()) < 0
                or int(flat.max()) >= ref.numel
                or not bool((torch.bincount(flat, minlength=ref.numel) == 1).all())
            ):
                raise ConfigError(
                    f"ranks.{ref.name}", f"must be a permutation of 0..{ref.numel - 1}"
                )
            rank = flat.numpy().astype(np.int32 if ref.numel < 2**31 else np.int64)
            w = tensors[ref.name].detach().reshape(-1).to(device="cpu", dtype=torch.float32)
            w_np = w.contiguous().numpy()
            self._rank.append(rank)
            self._w.append(w_np)
            if ref.numel == 0:
                self._range.append((0.0, 0.0))
                self._extreme_rank.append(-1)
                self._fine.append(np.zeros(0, dtype=np.uint16))
                continue
            lo, hi = float(w_np.min()), float(w_np.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ConfigError(f"layers.{ref.name}", "holds nan or inf; only finite "
                                  "weights can be compressed")
            self._range.append((lo, hi))
            # the last weight of value lo (hi) to be pruned: its rank
            self._extreme_rank.append(min(int(rank[w_np == lo].max()),
                                          int(rank[w_np == hi].max())))
            self._fine.append(fine_index(w_np, lo, hi).astype(np.uint16) if lo < hi
                              else np.zeros(ref.numel, dtype=np.uint16))
        self._memo: LRU[tuple[int, Gene], LayerEntry] = LRU(
            memo_mb * 2**20, lambda e: storage(e.block)
        )
        bound = memo_mb if survivors_mb is None else survivors_mb
        self._survivors: LRU[tuple[int, int], Survivors] = LRU(
            bound * 2**20, lambda s: (object(), s.nbytes)
        )
        # sizes are tiny and needed even when activations come from the prefix cache
        self._stats: LRU[tuple[int, Gene], tuple[int, int]] = LRU(
            2_000_000, lambda _: (object(), 1)
        )

    @property
    def names(self) -> list[str]:
        """The layers, in gene order."""
        return list(self._names)

    @property
    def device(self) -> torch.device:
        """Where the dense student weights are put."""
        return self._device

    def info(self) -> dict[str, int]:
        return {"memo_hits": self._memo.hits, "memo_misses": self._memo.misses,
                "memo_entries": len(self._memo), "survivor_hits": self._survivors.hits,
                "survivor_misses": self._survivors.misses}

    def clear(self) -> None:
        self._memo.clear()
        self._survivors.clear()
        self._stats.clear()
        self._mask_cache.clear()

    def weights(self, j: int, genes: list[Gene]) -> torch.Tensor:
        """Dense student weights of layer ``j`` for each gene, ``(G, *shape)``, on the device.

        Memo hits that are consecutive rows of one block (or one row for every gene) are
        returned as a view; otherwise the result is a new block, into which misses are
        computed (and memoised as rows of it) and hits and repeated genes are copied.
        """
        hits = [self._memo.get((j, g)) for g in genes]
        if all(h is not None for h in hits):
            return _stack_rows([(h.block, h.row) for h in hits if h is not None])
        ref = self._tensors[self._names[j]]
        if len(set(genes)) == 1:  # one distinct gene: one row, viewed G times
            block = torch.empty((1, *ref.shape), dtype=ref.dtype, device=self._device)
            g = genes[0]
            if g[0] == "shared":
                block[0].copy_(self._compute_shared(g)[j].weight)
            else:
                self._remember((j, g), self._compute_entry(j, g, block, 0))
            return block.expand(len(genes), *ref.shape)
        block = torch.empty((len(genes), *ref.shape), dtype=ref.dtype, device=self._device)
        first: dict[Gene, int] = {}
        for r, (g, h) in enumerate(zip(genes, hits, strict=True)):
            if h is not None:
                block[r].copy_(h.weight)
            elif g in first:
                block[r].copy_(block[first[g]])
            elif g[0] == "shared":  # computed with its whole group, which memoises them all
                first[g] = r
                block[r].copy_(self._compute_shared(g)[j].weight)
            else:
                first[g] = r
                self._remember((j, g), self._compute_entry(j, g, block, r))
        return block

    def _remember(self, key: tuple[int, Gene], e: LayerEntry) -> None:
        self._memo.put(key, e)
        self._stats.put(key, (e.n_kept, e.coded_bytes))

    def layer_stats(self, j: int, gene: Gene) -> tuple[int, int]:
        """``(n_kept, coded bytes)`` of layer ``j`` under ``gene``; computed from the survivor
        histogram alone (no dense weight) when not known yet."""
        st = self._stats.get((j, gene))
        if st is None:
            if gene[0] == "shared":
                self._compute_shared(gene)
                st = self._stats.get((j, gene))
                assert st is not None  # just computed and remembered
                return st
            _, pruned, bits, _ = gene
            sv = self._survivor_stats(j, pruned)
            counts, n_levels = self._levels(sv.hist, gene)[2:]
            st = (sv.hist.n, layer_coded_bytes(self._numel[j], counts, n_levels,
                                               mask_bytes=self._mask_bytes(j, pruned)))
            self._stats.put((j, gene), st)
        return st

    # --- computing one layer ----------------------------------------------------------------
    def _mask(self, j: int, pruned: int) -> np.ndarray:
        """bool ``(numel,)``: the survivors of layer ``j`` with ``pruned`` weights pruned."""
        return self._rank[j] >= pruned

    def _survivor_stats(self, j: int, pruned: int, mask: np.ndarray | None = None
                        ) -> Survivors:
        """The :class:`Survivors` of ``(j, pruned)``, computed once (bounded LRU)."""
        key = (j, pruned)
        sv = self._survivors.get(key)
        if sv is not None:
            return sv
        if mask is None:
            mask = self._mask(j, pruned)
        w, n_kept = self._w[j], self._numel[j] - pruned
        index: np.ndarray | None = None
        if n_kept == 0:
            empty = np.zeros(0, dtype=np.int64)
            hist = FineHistogram(0.0, 0.0, empty, empty, np.zeros(0))
        else:
            if pruned <= self._extreme_rank[j]:  # the layer's extremes survive: its grid
                lo, hi = self._range[j]
            else:
                lo = float(np.min(w, where=mask, initial=np.inf))
                hi = float(np.max(w, where=mask, initial=-np.inf))
            if lo == hi:
                hist = FineHistogram(lo, hi, np.zeros(1, dtype=np.int64),
                                     np.array([n_kept], dtype=np.int64), np.array([lo * n_kept]))
            else:
                if (lo, hi) != self._range[j]:
                    index = fine_index(w, lo, hi).astype(np.uint16)
                fine = self._fine[j] if index is None else index
                hist = fine_histogram_from(fine, w, lo, hi, mask=mask)
        sv = Survivors(hist, index)
        self._survivors.put(key, sv)
        return sv

    def _levels(self, hist: FineHistogram, gene: Gene
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``(level of each non-empty fine bin, codebook, level counts, n_levels)``."""
        quantizer, _, bits, _ = gene
        if hist.degenerate:
            level = np.zeros(hist.bins.size, dtype=np.int64)
            codebook = np.array([hist.lo if hist.n else 0.0], dtype=np.float32)
        else:
            level, codebook = _LEVELS[quantizer](hist, bits)
        counts = np.bincount(level, weights=hist.counts, minlength=codebook.size)
        return level, codebook, counts.astype(np.int64), int(codebook.size)

    def _compute_entry(self, j: int, gene: Gene, block: torch.Tensor, row: int) -> LayerEntry:
        """Layer ``j`` under a single-tensor gene, written into ``block[row]``: the same
        student as ``apply_layer`` (same fine histogram, levels and codebook)."""
        _, pruned, _, _ = gene
        mask = self._mask(j, pruned)
        sv = self._survivor_stats(j, pruned, mask)
        level, codebook, counts, n_levels = self._levels(sv.hist, gene)
        table = np.zeros(FINE_BINS, dtype=np.float32)  # the level value of each fine bin
        table[sv.hist.bins] = codebook[level]
        fine = self._fine[j] if sv.index is None else sv.index
        dst, direct = _cpu_row(block, row)
        np.take(table, fine, out=dst)
        np.multiply(dst, mask, out=dst)  # 0 where pruned (-0.0 for negative levels) ...
        np.add(dst, np.float32(0), out=dst)  # ... +0.0, as dequantize writes; kept: as is
        if not direct:
            block[row].copy_(torch.from_numpy(dst).view(block.shape[1:]))
        size = layer_coded_bytes(self._numel[j], counts, n_levels,
                                 mask_bytes=self._mask_bytes(j, pruned, mask))
        return LayerEntry(block, row, sv.hist.n, size)

    def _mask_bytes(self, j: int, pruned: int, mask: np.ndarray | None = None) -> int | None:
        """``mask_coded_bytes`` of layer ``j``'s mask with ``pruned`` weights pruned, once."""
        key = (j, pruned)
        if key not in self._mask_cache:
            grid = grid_of(tuple(self._shapes[j]))
            if grid is None:
                self._mask_cache[key] = None
            else:
                if mask is None:
                    mask = self._mask(j, pruned)
                self._mask_cache[key] = mask_coded_bytes(mask.reshape(grid))
        return self._mask_cache[key]

    def _compute_shared(self, gene: Gene) -> dict[int, LayerEntry]:
        """Every layer of a pooled (``shared``) group at once; each is also memoised."""
        _, _, k, group = gene
        masks = {jj: self._mask(jj, p) for jj, p in group}
        # survivors in row-major order, as apply_plan pools them
        values = {str(jj): torch.from_numpy(self._w[jj][masks[jj]]) for jj, _ in group}
        coded = shared_quantize(values, k)
        out = {}
        for jj, p in group:
            ref = self._tensors[self._names[jj]]
            block = torch.empty((1, *ref.shape), dtype=ref.dtype, device=self._device)
            indices, codebook = coded[str(jj)]
            dst, direct = _cpu_row(block, 0)
            dst.fill(0)
            dst[masks[jj]] = codebook.numpy()[indices.numpy()]
            if not direct:
                block[0].copy_(torch.from_numpy(dst).view(block.shape[1:]))
            counts = np.bincount(indices.numpy(), minlength=codebook.numel())
            size = layer_coded_bytes(self._numel[jj], counts, int(codebook.numel()),
                                     mask_bytes=self._mask_bytes(jj, p, masks[jj]))
            out[jj] = LayerEntry(block, 0, int(indices.numel()), size)
            self._remember((jj, gene_for(jj, gene)), out[jj])
        return out

    def sizes(self, genes: list[tuple[Gene, ...]], fixed_bytes: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Density, bits and coded size ``(n,)`` from the per-layer statistics; the size adds
        ``fixed_bytes`` (file header, plan, uncompressed tensors)."""
        n, L = len(genes), len(self._names)
        kept = np.empty((n, L))
        bits = np.empty((n, L))
        coded = np.empty((n, L))
        for i, row in enumerate(genes):
            for j, g in enumerate(row):
                kept[i, j], coded[i, j] = self.layer_stats(j, g)
                bits[i, j] = g[2] if g[0] != "shared" else max(1, math.ceil(math.log2(g[2])))
        total_kept = kept.sum(1)
        mean_bits = np.where(
            total_kept > 0, (kept * bits).sum(1) / np.maximum(total_kept, 1), bits.mean(1)
        )
        size = coded.sum(1) + fixed_bytes
        return total_kept / float(sum(self._numel)), mean_bits, size


def _cpu_row(block: torch.Tensor, row: int) -> tuple[np.ndarray, bool]:
    """A flat float32 numpy array to compute row ``row`` of ``block`` in: the row itself when
    the block is float32 on the CPU (``direct``), else a scratch array to copy from."""
    dst = block[row]
    if dst.device.type == "cpu" and dst.dtype == torch.float32 and dst.is_contiguous():
        return dst.view(-1).numpy(), True
    return np.empty(dst.numel(), dtype=np.float32), False


def gene_for(j: int, gene: Gene) -> Gene:
    """The gene of layer ``j`` of a shared group, given any member's gene (same K, group)."""
    _, _, k, group = gene
    return ("shared", dict(group)[j], k, group)


def _stack_rows(xs: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``(G, ...)`` from memo rows ``(block, row)``: a view when they are consecutive rows of
    one block (or one row repeated), else a stacked copy."""
    b0, r0 = xs[0]
    if all(b is b0 and r == r0 for b, r in xs):
        return b0[r0].unsqueeze(0).expand(len(xs), *b0.shape[1:])
    if all(b is b0 and r == r0 + i for i, (b, r) in enumerate(xs)):
        return b0[r0 : r0 + len(xs)]
    return torch.stack([b[r] for b, r in xs])
