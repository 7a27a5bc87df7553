"""Exact k-nearest-neighbour search by matrix products: PatchCore's memory bank, CFA's centroids and the knn
aligner's training descriptors all search with `nearest_neighbours`.
"""

from __future__ import annotations

import math

import torch

from cada.engine.device import full_precision

FLOAT_BYTES = 4
# The search reduces the distance matrix tile by tile while it is in cache (measured on 2 cores with 152 channels:
# 16 MiB tiles of 4096 queries run at 145 GFLOP/s, whole 0.5 GiB chunks at 81; benchmarks/patchcore_search.py).
QUERY_BLOCK = 4096
TILE_BYTES = 2**24


def chunk_rows(n_queries: int, budget_gib: float) -> int:
    """Bank rows per chunk so that one n_queries x rows float32 distance matrix fits the budget (at least 1)."""
    return max(1, int(budget_gib * 2**30) // (FLOAT_BYTES * max(1, n_queries)))


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    chunk: int | None = None,
    budget_gib: float = 0.5,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest bank rows of each query: (L2 distances Q x k ascending, indices Q x k); with `squared`,
    the squared distances (as computed: no square root taken).

    The distance matrix is computed in float32 (whatever the autocast), in tiles of QUERY_BLOCK queries (16
    times more on a GPU) x `chunk` bank rows (default: a tile of `tile_bytes`, or less if `budget_gib` says so),
    keeping a running top-k per query, so the full matrix is never built and each tile is reduced while it is
    still in cache: that is what brings the search to the speed of the matrix product itself
    (benchmarks/patchcore_search.py). Within a tile only |k|^2 - 2 q.k is computed;
    |q|^2 is the same along a row, so it is added once to the k best. Rounding is monotone, so the distances
    equal those of the full formula exactly. Ties keep the lower bank index, as a brute-force argmin does.

    `exclude` = (query groups Q, bank groups N), integers: a query never matches a bank row of its own group
    (PatchCore's training-set maps leave each image's own patches out); a query with nothing left gets inf.

    While torch's tracer records the search (ONNX export), `_nearest_traced` runs instead: the query tiles are
    sized from the example's query count, which a traced graph would keep for every input.
    """
    if len(bank) == 0:
        raise ValueError("nothing to search: the bank is empty (fit the model first)")
    with full_precision(queries.device):
        if torch.jit.is_tracing():
            assert exclude is None, "leaving groups out is for training-set maps, never exported"
            squares, indices = _nearest_traced(queries.float(), bank, k, chunk or chunk_rows(QUERY_BLOCK, budget_gib))
        else:
            squares, indices = _nearest(queries.float(), bank, k, chunk, budget_gib, exclude)
    return (squares if squared else squares.sqrt()), indices


def _nearest_traced(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The search as a graph for any number of queries: all queries at once against chunks of the bank (the
    bank's size is the model's, so that loop is the same for every input); the k best kept by top-k."""
    k = min(k, len(bank))
    bank_sq = bank.pow(2).sum(dim=1)
    values = indices = None
    for start in range(0, len(bank), chunk):
        partial = torch.addmm(
            bank_sq[start : start + chunk].unsqueeze(0), queries, bank[start : start + chunk].T, alpha=-2.0
        )
        best, index = partial.topk(min(k, partial.shape[1]), dim=1, largest=False)
        if values is None or indices is None:
            values, indices = best, index + start
        else:
            values, order = torch.cat([values, best], dim=1).topk(k, dim=1, largest=False)
            indices = torch.cat([indices, index + start], dim=1).gather(1, order)
    assert values is not None and indices is not None
    return (values + queries.pow(2).sum(dim=1, keepdim=True)).clamp_min(0), indices


def tile_bytes(device: torch.device) -> int:
    """One tile of the distance matrix: TILE_BYTES on the CPU (cache-sized); on a GPU large tiles keep it busy,
    a quarter of its free memory up to 1 GiB."""
    if device.type != "cuda":
        return TILE_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(TILE_BYTES, min(2**30, free // 4))


def _nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    chunk: int | None,
    budget_gib: float,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(k, len(bank))
    on_gpu = queries.device.type == "cuda"
    query_block = min(len(queries), 16 * QUERY_BLOCK if on_gpu else QUERY_BLOCK) or 1
    chunk = chunk or chunk_rows(query_block, min(budget_gib, tile_bytes(queries.device) / 2**30))
    bank_sq = bank.pow(2).sum(dim=1)
    best = queries.new_full((len(queries), k), math.inf)
    best_index = torch.zeros((len(queries), k), dtype=torch.long, device=queries.device)
    for q0 in range(0, len(queries), query_block):
        block = queries[q0 : q0 + query_block]
        values, index = best[q0 : q0 + query_block], best_index[q0 : q0 + query_block]  # views, updated in place
        for start in range(0, len(bank), chunk):
            partial = torch.addmm(
                bank_sq[start : start + chunk].unsqueeze(0), block, bank[start : start + chunk].T, alpha=-2.0
            )
            if exclude is not None:
                own = exclude[0][q0 : q0 + query_block, None] == exclude[1][None, start : start + chunk]
                partial.masked_fill_(own, math.inf)
            if k == 1:
                tile_values, tile_index = partial.min(dim=1, keepdim=True)
                better = tile_values < values  # strict: an earlier chunk keeps a tie
                values.copy_(torch.where(better, tile_values, values))
                index.copy_(torch.where(better, tile_index + start, index))
            else:
                tile_values, tile_index = partial.topk(min(k, partial.shape[1]), dim=1, largest=False, sorted=True)
                merged = torch.cat([values, tile_values], dim=1)
                merged_index = torch.cat([index, tile_index + start], dim=1)
                # a stable sort keeps the earlier chunk (the lower index) first among equal distances
                merged, order = merged.sort(dim=1, stable=True)
                values.copy_(merged[:, :k])
                index.copy_(merged_index.gather(1, order[:, :k]))
    best.add_(queries.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)
    return best, best_index
