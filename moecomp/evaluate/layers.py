"""The layer memo: every compressed layer a population needs, computed once.

A compressed layer depends only on ``(layer, n_pruned, bits, quantizer)`` (its *gene*), so its
dense student weight and its coded-size estimate are kept in a bounded LRU. The weights are
sorted by relevance rank once: the survivors of any sparsity are then a suffix (a slice), and
pruning is never a sort.
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
from moecomp.quantize import kmeans_quantize, shared_quantize, uniform_quantize
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
_QUANTIZE: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "uniform": uniform_quantize,
    "kmeans": kmeans_quantize,
}


class LayerBank:
    """The compressed layers of one target (``target.layers`` order, index ``j``).

    ranks: name -> int64 rank tensor of each layer's shape (rank 0 pruned first);
    tensors: the teacher's tensors as students start from (dense ones rounded);
    memo_mb: bound of the memo of dense student weights (0: nothing kept).
    """

    def __init__(self, target: Target, ranks: dict[str, torch.Tensor],
                 tensors: dict[str, torch.Tensor], *, memo_mb: float) -> None:
        self._names = target.layer_names
        self._numel = [ref.numel for ref in target.layers]
        self._shapes = [tuple(ref.shape) for ref in target.layers]
        self._tensors = tensors
        self._mask_cache: dict[tuple[int, int], int | None] = {}
        self._by_rank_w: list[torch.Tensor] = []
        self._by_rank_pos: list[torch.Tensor] = []
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
            # Weights sorted by rank: the survivors of any sparsity are a suffix (a slice).
            order = torch.empty(ref.numel, dtype=torch.int64)
            order[flat] = torch.arange(ref.numel)
            w = tensors[ref.name].reshape(-1).to(device="cpu", dtype=torch.float32)
            self._by_rank_w.append(w[order].contiguous())
            self._by_rank_pos.append(order)
        self._memo: LRU[tuple[int, Gene], LayerEntry] = LRU(
            memo_mb * 2**20, lambda e: storage(e.block)
        )
        # sizes are tiny and needed even when activations come from the prefix cache
        self._stats: LRU[tuple[int, Gene], tuple[int, int]] = LRU(
            2_000_000, lambda _: (object(), 1)
        )

    def info(self) -> dict[str, int]:
        return {"memo_hits": self._memo.hits, "memo_misses": self._memo.misses,
                "memo_entries": len(self._memo)}

    def clear(self) -> None:
        self._memo.clear()
        self._stats.clear()
        self._mask_cache.clear()

    def weights(self, j: int, genes: list[Gene]) -> torch.Tensor:
        """Dense student weights of layer ``j`` for each gene, ``(G, *shape)``.

        Memo hits that are consecutive rows of one block are returned as a view; otherwise
        the result is a new block, into which misses are computed (and memoised as rows of
        it) and hits and repeated genes are copied.
        """
        hits = [self._memo.get((j, g)) for g in genes]
        if all(h is not None for h in hits):
            return _stack_rows([(h.block, h.row) for h in hits if h is not None])
        ref = self._tensors[self._names[j]]
        block = torch.empty((len(genes), *ref.shape), dtype=ref.dtype, device=ref.device)
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
        st = self._stats.get((j, gene))
        if st is None:
            self.weights(j, [gene])
            st = self._stats.get((j, gene))
            assert st is not None  # just computed and remembered
        return st

    def _finish(
        self,
        j: int,
        pruned: int,
        indices: torch.Tensor,
        codebook: torch.Tensor,
        block: torch.Tensor,
        row: int,
    ) -> LayerEntry:
        """Write the dense student weight into ``block[row]`` and estimate the coded size."""
        numel = self._numel[j]
        dst = block[row]
        cpu32 = dst.device.type == "cpu" and dst.dtype == torch.float32
        flat = dst.view(-1) if cpu32 else torch.empty(numel, dtype=torch.float32)
        flat.zero_()
        flat[self._by_rank_pos[j][pruned:]] = codebook[indices]
        if not cpu32:
            dst.copy_(flat.view(dst.shape))
        counts = torch.bincount(indices, minlength=codebook.numel()).numpy()
        size = layer_coded_bytes(numel, counts, int(codebook.numel()),
                                 mask_bytes=self._mask_bytes(j, pruned))
        return LayerEntry(block, row, int(indices.numel()), size)

    def _mask_bytes(self, j: int, pruned: int) -> int | None:
        """``mask_coded_bytes`` of layer ``j``'s mask with ``pruned`` weights pruned, once."""
        key = (j, pruned)
        if key not in self._mask_cache:
            grid = grid_of(tuple(self._shapes[j]))
            if grid is None:
                self._mask_cache[key] = None
            else:
                mask = np.zeros(self._numel[j], dtype=bool)
                mask[self._by_rank_pos[j][pruned:].cpu().numpy()] = True
                self._mask_cache[key] = mask_coded_bytes(mask.reshape(grid))
        return self._mask_cache[key]

    def _compute_entry(self, j: int, gene: Gene, block: torch.Tensor, row: int) -> LayerEntry:
        quantizer, pruned, bits, _ = gene
        values = self._by_rank_w[j][pruned:]
        indices, codebook = _QUANTIZE[quantizer](values, bits)
        return self._finish(j, pruned, indices, codebook, block, row)

    def _compute_shared(self, gene: Gene) -> dict[int, LayerEntry]:
        """Every layer of a pooled (``shared``) group at once; each is also memoised."""
        _, _, k, group = gene
        values = {str(jj): self._by_rank_w[jj][p:] for jj, p in group}
        coded = shared_quantize(values, k)
        out = {}
        for jj, p in group:
            ref = self._tensors[self._names[jj]]
            block = torch.empty((1, *ref.shape), dtype=ref.dtype, device=ref.device)
            out[jj] = self._finish(jj, p, *coded[str(jj)], block, 0)
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
