"""The exact nearest-neighbour search (PatchCore's bank, CFA's centroids, the knn aligner) against brute force."""

import math

import pytest
import torch

from cada import neighbours
from cada.neighbours import chunk_rows, nearest_neighbours


@pytest.mark.parametrize("chunk", [1, 7, 64, 299, 300, 1000])
def test_chunked_search_equals_brute_force(chunk):
    generator = torch.Generator().manual_seed(chunk)
    queries, bank = torch.randn(50, 16, generator=generator), torch.randn(300, 16, generator=generator)
    exact = torch.cdist(queries.double(), bank.double())
    distance, index = nearest_neighbours(queries, bank, chunk=chunk)
    assert distance.shape == index.shape == (50, 1)
    assert torch.equal(index[:, 0], exact.argmin(dim=1))
    assert torch.allclose(distance[:, 0].double(), exact.amin(dim=1), atol=1e-4)
    distance, index = nearest_neighbours(queries, bank, k=5, chunk=chunk)
    values, expected = exact.topk(5, dim=1, largest=False)
    assert torch.equal(index, expected)
    assert torch.allclose(distance.double(), values, atol=1e-4)


@pytest.mark.parametrize("k", [1, 4])
def test_tiled_search_with_exclusion_equals_masked_brute_force(monkeypatch, k):
    """Several query blocks and bank chunks, each query barred from the bank rows of its own group."""
    monkeypatch.setattr(neighbours, "QUERY_BLOCK", 7)
    generator = torch.Generator().manual_seed(k)
    queries, bank = torch.randn(40, 8, generator=generator), torch.randn(90, 8, generator=generator)
    query_group, bank_group = torch.arange(40) % 5, torch.randint(0, 6, (90,), generator=generator)
    exact = torch.cdist(queries.double(), bank.double())
    exact[query_group[:, None] == bank_group[None, :]] = math.inf
    values, expected = exact.topk(k, dim=1, largest=False)
    distance, index = nearest_neighbours(queries, bank, k=k, chunk=13, exclude=(query_group, bank_group))
    assert torch.equal(index, expected)
    assert torch.allclose(distance.double(), values, atol=1e-4)
    assert (bank_group[index] != query_group[:, None]).all()


def test_search_keeps_the_lower_index_on_ties():
    queries, bank = torch.zeros(3, 4), torch.ones(10, 4)  # every bank row at the same distance
    assert nearest_neighbours(queries, bank, chunk=3)[1][:, 0].tolist() == [0, 0, 0]
    assert nearest_neighbours(queries, bank, k=4, chunk=3)[1].tolist() == [[0, 1, 2, 3]] * 3


def test_chunk_follows_the_memory_budget():
    assert chunk_rows(1024, 1 / 1024) == 2**20 // (4 * 1024)  # 1 MiB of float32 for 1024 queries: 256 rows
    assert chunk_rows(10**9, 1e-6) == 1  # never zero
    # the default chunk of the search obeys the budget: 40 queries, 40 x 100 floats per chunk -> 3 chunks of 300
    queries, bank = torch.randn(40, 8), torch.randn(300, 8)
    assert torch.equal(
        nearest_neighbours(queries, bank, budget_gib=40 * 100 * 4 / 2**30)[1],
        nearest_neighbours(queries, bank, chunk=300)[1],
    )


def test_squared_distances_are_the_distances_before_the_root():
    generator = torch.Generator().manual_seed(3)
    queries, bank = torch.randn(20, 6, generator=generator), torch.randn(50, 6, generator=generator)
    squares, index = nearest_neighbours(queries, bank, k=3, squared=True)
    distance, same_index = nearest_neighbours(queries, bank, k=3)
    assert torch.equal(index, same_index) and torch.equal(squares.sqrt(), distance)
    exact = torch.cdist(queries.double(), bank.double()).pow(2).topk(3, dim=1, largest=False).values
    assert torch.allclose(squares.double(), exact, atol=1e-4)


def test_search_on_an_empty_bank_says_what_to_do():
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbours(torch.randn(2, 4), torch.empty(0, 4))


@pytest.mark.parametrize("k", [1, 4])
def test_the_traced_search_equals_the_tiled_one(k):
    """What an exported graph runs (all queries at once, chunks of the bank) finds the same neighbours."""
    generator = torch.Generator().manual_seed(k)
    queries, bank = torch.randn(70, 8, generator=generator), torch.randn(90, 8, generator=generator)
    expected = nearest_neighbours(queries, bank, k=k, chunk=13)
    values, index = neighbours._nearest_traced(queries, bank, k, chunk=13)
    assert torch.equal(index, expected[1]) and torch.allclose(values.sqrt(), expected[0], atol=1e-5)
