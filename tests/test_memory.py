"""Tests of the episodic memory against independent references (numpy brute force, a Python ring,
a one-at-a-time Algorithm R)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import pickle
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_mbpa._exact_search as _exact_search
import lightning_mbpa.memory as memory_module
from lightning_mbpa._neighbours import gather_cpu
from lightning_mbpa.memory import EpisodicMemory, Neighbours

HYPOTHESIS = settings(max_examples=60, deadline=None)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------- references and helpers


def brute_force(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """All squared distances [B, N] in float64."""
    diff = queries.astype(np.float64)[:, None, :] - keys.astype(np.float64)[None, :, :]
    return (diff**2).sum(-1)


def assert_exact_knn(found: Neighbours, keys: np.ndarray, queries: np.ndarray, k: int) -> None:
    """Tie-aware check of an exact K-NN result against numpy brute force."""
    n = keys.shape[0]
    dist = brute_force(keys, queries)
    kk = min(k, n)
    assert found.indices.shape == (queries.shape[0], k)
    mask = found.mask.cpu().numpy()
    assert (mask[:, :kk]).all() and not mask[:, kk:].any()
    indices = found.indices.cpu().numpy()
    distances = found.distances.cpu().numpy()
    for row in range(queries.shape[0]):
        got = indices[row, :kk]
        assert len(set(got.tolist())) == kk, "a neighbour is returned twice"
        ref_sorted = np.sort(dist[row])
        kth = ref_sorted[kk - 1]
        tol = 1e-4 * max(kth, 1.0)
        # Every returned index is within the k nearest (ties at the boundary allowed).
        assert (dist[row, got] <= kth + tol).all()
        # The multiset of distances matches the reference's k smallest.
        np.testing.assert_allclose(np.sort(dist[row, got]), ref_sorted[:kk], rtol=1e-4, atol=1e-4)
        # Returned distances are the true distances of the returned keys, ascending.
        np.testing.assert_allclose(distances[row, :kk], dist[row, got], rtol=1e-4, atol=1e-5)
        assert (np.diff(distances[row, :kk]) >= 0).all()
    assert np.isinf(distances[:, kk:]).all()
    assert (indices[:, kk:] == -1).all()
    assert (found.values.cpu().numpy()[:, kk:] == 0).all()
    assert (found.keys.cpu()[:, kk:] == 0).all()


def assert_consistent(found: Neighbours, memory: EpisodicMemory) -> None:
    """Every returned neighbour is the *current* content of its slot (nothing stale)."""
    ok = found.mask.cpu()
    slots = found.indices.cpu()[ok]
    assert (slots >= 0).all() and (slots < len(memory)).all()
    assert torch.equal(memory.keys.cpu()[slots], found.keys.cpu()[ok].float())
    assert torch.equal(memory.values.cpu()[slots], found.values.cpu()[ok])
    assert (found.indices.cpu()[~ok] == -1).all()


def snapshot(memory: EpisodicMemory) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in memory.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def clustered(n: int, d: int, seed: int, clusters: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(clusters, d, generator=torch.Generator().manual_seed(1234)) * 4.0
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return centers[labels] + torch.randn(n, d, generator=g), labels


def tagged(start: int, n: int, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose first coordinate is the item number, labels equal to the item number."""
    ids = torch.arange(start, start + n)
    keys = torch.zeros(n, d)
    keys[:, 0] = ids.float()
    return keys, ids


# ---------------------------------------------------------------------- exact search


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("data", ["random", "duplicates"])
@pytest.mark.parametrize(("b", "k"), [(1, 1), (7, 5), (33, 16), (4, 100)])
def test_exact_search_matches_brute_force(backend: str, data: str, b: int, k: int) -> None:
    rng = np.random.default_rng(b * 100 + k)
    n, d = 60, 12
    if data == "random":
        keys = rng.standard_normal((n, d)).astype(np.float32)
        queries = rng.standard_normal((b, d)).astype(np.float32)
    else:  # few distinct vectors: many exact ties, many zero distances
        pool = rng.standard_normal((4, d)).astype(np.float32)
        keys = pool[rng.integers(0, 4, n)]
        queries = pool[rng.integers(0, 4, b)]
    memory = EpisodicMemory(100, backend=backend)
    memory.add(torch.from_numpy(keys), torch.from_numpy(rng.integers(0, 9, n)))
    assert memory.backend == backend
    found = memory.search(torch.from_numpy(queries), k)
    assert_exact_knn(found, keys, queries, k)
    assert_consistent(found, memory)


def test_torch_backend_merges_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(memory_module._TORCH_BLOCK_ELEMENTS, "cpu", 64)  # 64 // B rows per chunk
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    memory = EpisodicMemory(500, backend="torch")
    memory.add(torch.from_numpy(keys), torch.zeros(500, dtype=torch.long))
    for k in (1, 12, 30):
        assert_exact_knn(memory.search(torch.from_numpy(queries), k), keys, queries, k)


@pytest.mark.parametrize("data", ["random", "ties"])
# 4096: grouped for every kk; 4100: with a partial last group; 640, 300: at and below the bar
@pytest.mark.parametrize("columns", [4096, 4100, 640, 300])
@pytest.mark.parametrize("kk", [1, 5, 32])
def test_grouped_selection_matches_topk(data: str, columns: int, kk: int) -> None:
    """`_smallest` (group minima first) returns the values `topk` returns, at distinct columns
    that hold them, with and without a partial last group and many exact ties."""
    gen = torch.Generator().manual_seed(columns + kk)
    if data == "random":
        d = torch.randn(6, columns, generator=gen)
    else:  # few distinct values: ties at the k-th value across many groups
        d = torch.randint(0, 3, (6, columns), generator=gen).float()
    values, found = memory_module._smallest(d, kk)
    expected, _ = d.topk(kk, dim=1, largest=False)
    assert torch.equal(values.sort(1).values, expected.sort(1).values)
    assert torch.equal(d.gather(1, found), values)
    assert all(len(set(row.tolist())) == kk for row in found)


@pytest.mark.parametrize("data", ["random", "duplicates"])
@pytest.mark.parametrize("block", [None, 6 * 1500])  # one block; 1500 keys twice, then 1
def test_torch_backend_grouped_selection_matches_brute_force(
    monkeypatch: pytest.MonkeyPatch, data: str, block: int | None
) -> None:
    if block is not None:
        monkeypatch.setitem(memory_module._TORCH_BLOCK_ELEMENTS, "cpu", block)
    rng = np.random.default_rng(3)
    n, d = 3001, 8
    if data == "random":
        keys = rng.standard_normal((n, d)).astype(np.float32)
        queries = rng.standard_normal((6, d)).astype(np.float32)
    else:
        pool = rng.standard_normal((5, d)).astype(np.float32)
        keys = pool[rng.integers(0, 5, n)]
        queries = pool[rng.integers(0, 5, 6)]
    memory = EpisodicMemory(n, backend="torch")
    memory.add(torch.from_numpy(keys), torch.zeros(n, dtype=torch.long))
    for k in (1, 7, 11):  # 4·k·32 <= 1500: every chunk takes the grouped selection
        assert_exact_knn(memory.search(torch.from_numpy(queries), k), keys, queries, k)


def test_concurrent_torch_searches_do_not_share_a_score_block() -> None:
    """The CPU search reuses a score block across calls: one per thread."""
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((4000, 16)).astype(np.float32)
    memory = EpisodicMemory(4000, backend="torch")
    memory.add(torch.from_numpy(keys), torch.zeros(4000, dtype=torch.long))
    batches = [torch.from_numpy(rng.standard_normal((64, 16)).astype(np.float32)) for _ in range(8)]
    expected = [memory.search(q, 9).indices for q in batches]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            found = list(pool.map(lambda q: memory.search(q, 9).indices, batches))
            assert all(torch.equal(f, e) for f, e in zip(found, expected, strict=True))
        blocks = list(
            pool.map(lambda _: memory._exact.torch_kernel.score_block(2, 2).data_ptr(), range(2))
        )
    assert blocks[0] != memory._exact.torch_kernel.score_block(2, 2).data_ptr()
    memory.clear()  # releases every thread's block
    assert getattr(memory._exact.torch_kernel.scratch, "scores", None) is None


def test_faiss_backends_agree_and_flat_search_is_zero_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = clustered(300, 16, seed=0)
    q, _ = clustered(20, 16, seed=1)
    a = EpisodicMemory(300, backend="faiss")
    b = EpisodicMemory(300, backend="torch")
    a.add(x, y)
    b.add(x, y)
    seen = []
    real_knn = _exact_search.faiss_exact_candidates

    def spy(xq: np.ndarray, xb: np.ndarray, k: int, norms: np.ndarray) -> np.ndarray:
        seen.append(xb)
        return real_knn(xq, xb, k, norms)

    monkeypatch.setattr(_exact_search, "faiss_exact_candidates", spy)
    fa, fb = a.search(q, 10), b.search(q, 10)
    assert len(seen) == 1 and np.shares_memory(seen[0], a.keys.numpy())
    assert torch.equal(fa.indices, fb.indices)
    torch.testing.assert_close(fa.distances, fb.distances)


def test_empty_and_underfilled_memory_are_masked() -> None:
    memory = EpisodicMemory(10)
    found = memory.search(torch.randn(3, 5), k=4)
    assert not found.mask.any() and (found.indices == -1).all()
    assert found.keys.shape == (3, 4, 5) and torch.isinf(found.distances).all()
    memory.add(torch.randn(2, 5), torch.tensor([1, 2]))
    found = memory.search(torch.randn(3, 5), k=4)
    assert found.mask.sum(1).tolist() == [2, 2, 2]
    assert not found.mask[:, 2:].any()
    empty_batch = memory.search(torch.randn(0, 5), k=4)
    assert empty_batch.keys.shape == (0, 4, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_results_follow_the_query_dtype(dtype: torch.dtype) -> None:
    memory = EpisodicMemory(50, dim=8)
    x = torch.randn(50, 8)
    memory.add(x, torch.arange(50))
    found = memory.search(x[:4].to(dtype), k=3)
    assert found.keys.dtype == dtype
    assert found.distances.dtype == torch.float32
    assert found.values.dtype == found.indices.dtype == torch.int64
    assert found.mask.dtype == torch.bool
    assert found.indices[:, 0].tolist() == [0, 1, 2, 3]
    assert memory.keys.dtype == torch.float32


def test_keys_are_a_view_and_stored_detached() -> None:
    memory = EpisodicMemory(8, dim=2)
    keys = torch.randn(3, 2, requires_grad=True)
    memory.add(keys * 2, torch.tensor([0.0, 1.0, 2.0]))  # integral float labels are accepted
    assert not memory.keys.requires_grad
    assert memory.values.tolist() == [0, 1, 2] and memory.values.dtype == torch.int64
    assert memory.keys.data_ptr() == memory._keys.data_ptr()
    assert memory.keys.shape == (3, 2)


def test_first_write_in_inference_mode() -> None:
    memory = EpisodicMemory(8)
    with torch.inference_mode():
        memory.add(torch.randn(3, 4), torch.arange(3))
        memory.search(torch.randn(2, 4), 2)
    memory.add(torch.randn(3, 4), torch.arange(3))  # buffers are not inference tensors
    assert len(memory) == 6


# ---------------------------------------------------------------------- FIFO


class RingModel:
    """One-item-at-a-time FIFO reference."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.slots, self.cursor = capacity, [], 0

    def add(self, items: list[int]) -> list[int]:
        where: dict[int, int] = {}
        for item in items:
            if len(self.slots) < self.capacity:
                self.slots.append(item)
            else:
                where = {i: s for i, s in where.items() if s != self.cursor}
                self.slots[self.cursor] = item
            where[item] = self.cursor
            self.cursor = (self.cursor + 1) % self.capacity
        return [where.get(item, -1) for item in items]


@HYPOTHESIS
@given(
    capacity=st.integers(1, 12),
    batches=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    backend=st.sampled_from(["faiss", "torch"]),
)
def test_fifo_matches_a_ring(capacity: int, batches: list[int], backend: str) -> None:
    memory = EpisodicMemory(capacity, eviction="fifo", backend=backend)
    model = RingModel(capacity)
    seen = 0
    for n in batches:
        keys, ids = tagged(seen, n)
        slots = memory.add(keys, ids)
        assert slots.tolist() == model.add(ids.tolist())
        seen += n
        assert memory.num_seen == seen
        assert len(memory) == min(seen, capacity) <= capacity
        assert memory.values.tolist() == model.slots
        if len(memory):
            assert memory.keys[:, 0].long().tolist() == model.slots
        kept = slots >= 0
        assert torch.equal(memory.values[slots[kept]], ids[kept])
    if len(memory):
        assert_consistent(memory.search(torch.randn(3, 3), 4), memory)


def test_fifo_wraps_and_keeps_the_tail_of_an_oversized_batch() -> None:
    memory = EpisodicMemory(5)
    memory.add(*tagged(0, 3))
    assert memory.add(*tagged(3, 4)).tolist() == [3, 4, 0, 1]
    assert memory.values.tolist() == [5, 6, 2, 3, 4]
    # cursor at 2: items 7..18 go to slots 2, 3, 4, 0, ...; only the last 5 survive
    assert memory.add(*tagged(7, 12)).tolist() == [-1] * 7 + [4, 0, 1, 2, 3]
    assert memory.values.tolist() == [15, 16, 17, 18, 14]


@pytest.mark.parametrize("eviction", ["fifo", "reservoir", "class_balanced"])
def test_one_bulk_add_leaves_the_memory_of_one_add_per_batch(eviction: str) -> None:
    # The callback writes training batches in bulk: the memory must be bit-identical, squared
    # norms included (the torch backend ranks by them).
    g = torch.Generator().manual_seed(0)
    sizes = [3, 17, 1, 40, 9, 25, 64, 2]  # wraps the ring, straddles the reservoir's capacity
    batches = [
        (torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes
    ]
    per_batch = EpisodicMemory(50, eviction=eviction, seed=4)
    returned = torch.cat([per_batch.add(x, y) for x, y in batches])
    bulk = EpisodicMemory(50, eviction=eviction, seed=4)
    got = bulk.add(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    assert_same_state(snapshot(bulk), snapshot(per_batch))
    assert torch.equal(bulk._norms[: len(bulk)], per_batch._norms[: len(per_batch)])
    reference = (bulk.keys.double() ** 2).sum(1).float()
    torch.testing.assert_close(bulk._norms[: len(bulk)], reference)
    kept = got >= 0  # -1: overwritten later in the same call
    assert int(kept.sum()) == len(bulk)
    if eviction == "fifo":  # reservoir: a row may win a slot in its call and lose it later
        assert torch.equal(got[kept], returned[kept])


def test_keys_whose_squares_overflow_are_finite_and_accepted() -> None:
    # Finiteness is read off the squared norms; an overflowing square must not reject a key.
    memory = EpisodicMemory(4, dim=2)
    memory.add(torch.tensor([[1e20, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert len(memory) == 2
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            memory.add(torch.tensor([[1e20, bad]]), torch.tensor([0]))
    assert len(memory) == 2


def test_gather_reorders_candidates_that_come_unsorted() -> None:
    x, y = clustered(200, 8, seed=0)
    memory = EpisodicMemory(200, backend="torch")
    memory.add(x, y)
    q, _ = clustered(12, 8, seed=1)
    found = memory.search(q, 9)
    shuffled = found.indices.numpy()[:, np.random.default_rng(0).permutation(9)]
    keys, values = memory.keys.numpy(), memory.values.numpy()
    again = gather_cpu(keys, values, q.numpy(), shuffled, 9, q)
    for name in Neighbours._fields:
        assert torch.equal(getattr(again, name), getattr(found, name)), name
    assert_exact_knn(found, x.numpy(), q.numpy(), 9)


# ---------------------------------------------------------------------- reservoir


def reservoir_reference(
    capacity: int, batches: list[int], seed: int
) -> tuple[list[int], list[int]]:
    """Literal Algorithm R, one item at a time, from the same generator's draws."""
    g = torch.Generator().manual_seed(seed)
    slots: list[int] = []
    returned: list[int] = []
    t = 0
    for n in batches:
        where: dict[int, int] = {}
        for _ in range(n):
            if t < capacity:
                slots.append(t)
                where = {i: s for i, s in where.items() if s != t}
                where[t] = t
            else:
                j = math.floor(torch.rand(1, dtype=torch.float64, generator=g).item() * (t + 1))
                if j < capacity:
                    slots[j] = t
                    where = {i: s for i, s in where.items() if s != j}
                    where[t] = j
            t += 1
        start = t - n
        returned += [where.get(i, -1) for i in range(start, t)]
    return slots, returned


@HYPOTHESIS
@given(
    capacity=st.integers(1, 10),
    batches=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_reservoir_matches_sequential_algorithm_r(
    capacity: int, batches: list[int], seed: int
) -> None:
    memory = EpisodicMemory(capacity, eviction="reservoir", seed=seed)
    returned: list[int] = []
    seen = 0
    for n in batches:
        keys, ids = tagged(seen, n)
        returned += memory.add(keys, ids).tolist()
        seen += n
        assert len(memory) == min(seen, capacity)
        assert len(set(memory.values.tolist())) == len(memory)  # no item twice
        assert set(memory.values.tolist()) <= set(range(seen))
    expected_slots, expected_returned = reservoir_reference(capacity, batches, seed)
    assert memory.values.tolist() == expected_slots
    if len(memory):
        assert memory.keys[:, 0].long().tolist() == expected_slots
    assert returned == expected_returned


def test_reservoir_is_batch_size_invariant() -> None:
    one = EpisodicMemory(7, eviction="reservoir", seed=3)
    many = EpisodicMemory(7, eviction="reservoir", seed=3)
    for i in range(60):
        one.add(*tagged(i, 1))
    for start, n in [(0, 5), (5, 30), (35, 1), (36, 24)]:
        many.add(*tagged(start, n))
    assert one.values.tolist() == many.values.tolist()


def test_reservoir_inclusion_is_uniform() -> None:
    capacity, stream, runs = 10, 50, 1500
    counts = np.zeros(stream)
    for seed in range(runs):
        memory = EpisodicMemory(capacity, dim=1, eviction="reservoir", seed=seed)
        for start, n in [(0, 4), (4, 13), (17, 1), (18, 32)]:  # batches straddle the capacity
            memory.add(
                torch.arange(start, start + n, dtype=torch.float32)[:, None],
                torch.arange(start, start + n),
            )
        counts[memory.values.numpy()] += 1
    p = capacity / stream
    sd = math.sqrt(runs * p * (1 - p))
    # Every item's inclusion count within 5 standard deviations of runs * capacity / stream.
    assert np.abs(counts - runs * p).max() < 5 * sd
    # Chi-square over the 50 items, compared with the chi2(49) quantile at p = 1e-4 (Wilson-Hilferty).
    chi2 = (((counts - runs * p) ** 2) / (runs * p * (1 - p))).sum()
    dof, z = stream - 1, 3.719
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical
    # Early and late items are equally likely (an off-by-one in the draw would skew this).
    assert abs(counts[:10].mean() - counts[-10:].mean()) < 4 * sd / math.sqrt(10)


# ---------------------------------------------------------------------- state


def roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("eviction", ["fifo", "reservoir", "class_balanced"])
@pytest.mark.parametrize("index", ["Flat", "HNSW32"])
def test_state_dict_round_trip_and_continuation(eviction: str, index: str) -> None:
    original = EpisodicMemory(40, eviction=eviction, index=index, seed=5)
    for i in range(5):
        original.add(*clustered(17, 6, seed=i))
    state = roundtrip(original.state_dict())
    extra = {"inserted"} if eviction == "class_balanced" else set()
    assert set(state) == set(memory_module.STATE_KEYS) | extra
    assert state["keys"].shape == (40, 6) and state["values"].shape == (40,)
    assert state["keys"].untyped_storage().nbytes() == 40 * 6 * 4  # compact copy, not the buffer
    assert state["keys"].data_ptr() != original.keys.data_ptr()
    restored = EpisodicMemory(40, eviction=eviction, index=index, seed=99)  # seed comes from state
    restored.load_state_dict(state)
    assert_same_state(restored.state_dict(), original.state_dict())
    for i in range(5, 9):
        batch = clustered(23, 6, seed=i)
        assert torch.equal(original.add(*batch), restored.add(*batch))
        assert_same_state(restored.state_dict(), original.state_dict())
    q, _ = clustered(8, 6, seed=100)
    a, b = original.search(q, 5), restored.search(q, 5)
    assert_consistent(b, restored)
    if index == "Flat":
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_state_of_an_unfixed_memory_and_partial_fill() -> None:
    empty = EpisodicMemory(6)
    state = roundtrip(empty.state_dict())
    assert int(state["dim"]) == -1
    other = EpisodicMemory(6, dim=4)
    other.load_state_dict(state)
    assert other.dim == 4 and len(other) == 0
    partial = EpisodicMemory(6)
    partial.add(*tagged(0, 2, d=4))
    fresh = EpisodicMemory(6)
    fresh.load_state_dict(roundtrip(partial.state_dict()))
    assert fresh.dim == 4 and fresh.values.tolist() == [0, 1]
    assert fresh.add(*tagged(2, 1, d=4)).tolist() == [2]


def test_version_increases_with_every_change_of_the_entries_and_only_then() -> None:
    memory = EpisodicMemory(capacity=8)
    seen = [memory.version]

    def changed() -> None:
        assert memory.version > seen[-1]
        seen.append(memory.version)

    memory.add(torch.randn(5, 3), torch.arange(5))
    changed()
    memory.search(torch.randn(2, 3), k=2)
    len(memory), memory.state_dict()
    assert memory.version == seen[-1]  # reads change nothing
    memory.update_keys(torch.tensor([1, 3]), torch.randn(2, 3))
    changed()
    state = memory.state_dict()
    memory.clear()
    changed()
    memory.load_state_dict(state)
    changed()
    memory.to("cpu")  # already there: nothing moves
    assert memory.version == seen[-1]


def test_clear_resets_to_a_fresh_memory() -> None:
    memory = EpisodicMemory(5, eviction="reservoir", seed=1)
    memory.add(*tagged(0, 30))
    memory.clear()
    assert len(memory) == 0 and memory.num_seen == 0 and memory.dim == 3
    fresh = EpisodicMemory(5, eviction="reservoir", seed=1)
    memory.add(*tagged(0, 30))
    fresh.add(*tagged(0, 30))
    assert_same_state(memory.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_pickle(index: str) -> None:
    memory = EpisodicMemory(300, eviction="reservoir", index=index, seed=2)
    memory.add(*clustered(400, 8, seed=0))
    copy = pickle.loads(pickle.dumps(memory))
    assert_same_state(copy.state_dict(), memory.state_dict())
    assert (copy.index_string, copy.eviction, copy.capacity) == (index, "reservoir", 300)
    batch = clustered(50, 8, seed=1)
    assert torch.equal(copy.add(*batch), memory.add(*batch))
    q, _ = clustered(5, 8, seed=3)
    assert_consistent(copy.search(q, 4), copy)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(capacity=300),
        dict(capacity=300, dim=8, eviction="reservoir", seed=7, backend="torch"),
        dict(capacity=300, index="HNSW32", index_params="efSearch=48", backend="faiss"),
        dict(
            capacity=200, index="IVF4,Flat", index_params="nprobe=3", eviction="reservoir", seed=3
        ),
    ],
)
def test_config_rebuilds_an_identically_configured_empty_memory(kwargs: dict) -> None:
    memory = EpisodicMemory(**kwargs)
    expected = {
        "capacity": kwargs["capacity"],
        "dim": kwargs.get("dim"),
        "eviction": kwargs.get("eviction", "fifo"),
        "index": kwargs.get("index", "Flat"),
        "backend": kwargs.get("backend", "auto"),  # as given, not as resolved
        "seed": kwargs.get("seed", 0),
        "device": "cpu",
        "index_params": kwargs.get("index_params", ""),
    }
    assert memory.config == expected
    assert json.loads(json.dumps(memory.config)) == expected  # primitives only
    memory.config["capacity"] = 1  # a copy: the memory is unchanged
    assert memory.capacity == kwargs["capacity"]

    x, y = clustered(250, 8, seed=0)
    memory.add(x, y)
    expected["dim"] = 8  # fixed by the first write
    assert memory.config == expected
    twin = EpisodicMemory(**memory.config)
    assert twin.config == memory.config and len(twin) == 0 and twin.dim == 8
    # Identically configured: the same writes give the same slots, state and neighbours.
    fresh = EpisodicMemory(**memory.config)
    again = EpisodicMemory(**kwargs)
    assert torch.equal(fresh.add(x, y), again.add(x, y))
    assert_same_state(fresh.state_dict(), again.state_dict())
    if "HNSW" in expected["index"]:
        assert faiss.downcast_index(fresh.faiss_index).hnsw.efSearch == 48
    if "IVF" in expected["index"]:
        assert faiss.extract_index_ivf(fresh.faiss_index).nprobe == 3
    q, _ = clustered(6, 8, seed=4)
    a, b = fresh.search(q, 5), again.search(q, 5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.distances, b.distances)


# ---------------------------------------------------------------------- approximate indexes


def recall(found: Neighbours, exact: Neighbours) -> float:
    hits = 0
    for row in range(found.indices.shape[0]):
        got = set(found.indices[row][found.mask[row]].tolist())
        hits += len(got & set(exact.indices[row][exact.mask[row]].tolist()))
    return hits / exact.mask.sum().item()


@pytest.mark.parametrize(("index", "params"), [("HNSW32", ""), ("IVF16,Flat", "nprobe=4")])
def test_approximate_search_without_dead_rows_equals_the_filtered_search(
    index: str, params: str
) -> None:
    # While nothing was overwritten the liveness selector is skipped and faiss' own distances
    # are kept: the results must be those of the filtered search with recomputed distances.
    x, y = clustered(900, 16, seed=0)
    memory = EpisodicMemory(1000, index=index, index_params=params)
    memory.add(x, y)
    ann = memory._ann
    assert ann is not None and ann.active and ann.dead == 0 and ann.exact_distances
    q, _ = clustered(30, 16, seed=1)
    fast = memory.search(q, 10)
    ann.dead, ann.exact_distances = 1, False  # force the selector and the recomputation
    try:
        slow = memory.search(q, 10)
    finally:
        ann.dead, ann.exact_distances = 0, True
    assert torch.equal(fast.indices, slow.indices)
    assert torch.equal(fast.keys, slow.keys) and torch.equal(fast.values, slow.values)
    torch.testing.assert_close(fast.distances, slow.distances, rtol=1e-5, atol=1e-5)
    assert_consistent(fast, memory)


@pytest.mark.parametrize("eviction", ["fifo", "reservoir", "class_balanced"])
@pytest.mark.parametrize(("index", "params"), [("HNSW32", ""), ("IVF16,Flat", "nprobe=4")])
def test_approximate_recall_and_no_stale_entries(eviction: str, index: str, params: str) -> None:
    d, k = 16, 10
    memory = EpisodicMemory(1200, eviction=eviction, index=index, index_params=params, seed=7)
    exact = EpisodicMemory(1200, eviction=eviction, seed=7)
    recalls = []
    for step in range(10):  # 3000 writes: several overwrites of every slot and compactions
        batch = clustered(300, d, seed=step)
        assert torch.equal(memory.add(*batch), exact.add(*batch))
        assert torch.equal(memory.keys, exact.keys)
        q, _ = clustered(40, d, seed=1000 + step)
        found = memory.search(q, k)
        assert_consistent(found, memory)
        ref = exact.search(q, k)
        recalls.append(recall(found, ref))
        mask = found.mask
        torch.testing.assert_close(
            found.distances[mask], ((found.keys - q[:, None]) ** 2).sum(-1)[mask]
        )  # exact distances for the returned keys
        ann = memory._ann
        assert ann is not None and ann.dead <= ann.rows - ann.dead  # compaction keeps dead <= live
    assert memory.is_trained
    assert np.mean(recalls) >= 0.9, recalls


def test_index_grows_by_the_new_rows_only() -> None:
    memory = EpisodicMemory(100, index="HNSW32")
    memory.add(*clustered(30, 8, seed=0))
    index = memory.faiss_index
    assert index.ntotal == 30
    memory.add(*clustered(30, 8, seed=1))
    assert memory.faiss_index is index and index.ntotal == 60
    memory.add(*clustered(60, 8, seed=2))  # 20 overwritten: dead 20 <= live 100
    assert index.ntotal == 120
    memory.add(*clustered(90, 8, seed=3))  # dead 110 > live 100: compaction
    assert index.ntotal == 100 and memory._ann.dead == 0


def test_untrained_index_searches_exactly_until_trained() -> None:
    memory = EpisodicMemory(2000, index="IVF8,Flat", index_params="nprobe=8")
    threshold = 39 * 8
    x, y = clustered(threshold - 1, 8, seed=0)
    memory.add(x, y)
    assert not memory.is_trained and memory.faiss_index.ntotal == 0
    q, _ = clustered(6, 8, seed=1)
    assert_exact_knn(memory.search(q, 5), x.numpy(), q.numpy(), 5)
    memory.add(*clustered(1, 8, seed=2))
    assert memory.is_trained and memory.faiss_index.ntotal == threshold
    found = memory.search(q, 5)
    assert_exact_knn(found, memory.keys.numpy(), q.numpy(), 5)  # nprobe = nlist: exhaustive


def test_small_capacity_trains_at_capacity_or_never() -> None:
    at_capacity = EpisodicMemory(50, index="IVF2,Flat")  # 39 * 2 = 78 > 50: trains when full
    at_capacity.add(*clustered(49, 4, seed=0))
    assert not at_capacity.is_trained
    at_capacity.add(*clustered(1, 4, seed=1))
    assert at_capacity.is_trained
    never = EpisodicMemory(4, index="IVF8,Flat")
    never.add(*clustered(20, 4, seed=0))
    assert not never.is_trained
    assert never.search(torch.randn(2, 4), 3).mask.all()


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -3}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 4, "dim": 0}, "dim"),
        ({"capacity": 4, "eviction": "lifo"}, "eviction"),
        ({"capacity": 4, "backend": "gpu"}, "backend"),
        ({"capacity": 4, "index": ""}, "index"),
        ({"capacity": 4, "index": "NoSuchIndex"}, "index"),
        ({"capacity": 4, "dim": 8, "index": "NoSuchIndex"}, "index"),
        ({"capacity": 4, "dim": 8, "index": "PQ3"}, "index"),
        ({"capacity": 4, "dim": 8, "index": "LSH"}, "index"),
        ({"capacity": 4, "index": "HNSW32", "backend": "torch"}, "backend"),
        ({"capacity": 4, "index_params": "nprobe=2"}, "index_params"),
        ({"capacity": 4, "dim": 8, "index": "HNSW32", "index_params": "nprobe=2"}, "index_params"),
        ({"capacity": 4, "seed": 1.5}, "seed"),
        ({"capacity": 4, "device": "nonsense"}, "device"),
        ({"capacity": 4, "device": "cuda", "backend": "faiss"}, "device"),
    ],
)
def test_constructor_rejects(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        EpisodicMemory(**kwargs)
    assert repr(kwargs[argument])[:10] in str(info.value) or argument == "device"


def test_unknown_index_string_keeps_faiss_message() -> None:
    with pytest.raises(ValueError, match="could not parse"):
        EpisodicMemory(4, index="NoSuchIndex")
    with pytest.raises(ValueError, match=r"d % M == 0"):
        EpisodicMemory(4, dim=8, index="PQ3")


def test_index_checked_at_the_first_write_when_dim_is_unknown() -> None:
    memory = EpisodicMemory(4, index="PQ3")  # parses; only the width (8 % 3) is wrong
    before = snapshot(memory)
    with pytest.raises(ValueError, match=r"`index`.*d % M == 0"):
        memory.add(torch.randn(2, 8), torch.tensor([0, 1]))
    assert memory.dim is None and len(memory) == 0 and memory.num_seen == 0
    assert_same_state(snapshot(memory), before)
    memory.add(torch.randn(2, 9), torch.tensor([0, 1]))  # 9 % 3 == 0
    assert memory.dim == 9


def _filled(eviction: str = "fifo") -> EpisodicMemory:
    memory = EpisodicMemory(6, eviction=eviction, seed=1)
    memory.add(*tagged(0, 8, d=4))
    return memory


BAD_ADDS = [
    (torch.randn(2, 5), torch.tensor([0, 1]), "keys", "(2, 5)"),
    (torch.randn(4), torch.tensor([0, 1, 2, 3]), "keys", "(4,)"),
    (torch.randn(2, 2, 4), torch.tensor([0, 1]), "keys", "(2, 2, 4)"),
    (torch.tensor([[0.0, 1.0, float("nan"), 0.0]]), torch.tensor([0]), "keys", "NaN"),
    (torch.tensor([[0.0, float("inf"), 0.0, 0.0]]), torch.tensor([0]), "keys", "infinite"),
    (torch.full((1, 4), 1e39, dtype=torch.float64), torch.tensor([0]), "keys", "float32"),
    (torch.ones(2, 4, dtype=torch.bool), torch.tensor([0, 1]), "keys", "bool"),
    (torch.randn(2, 4), torch.tensor([0, -1]), "values", "-1"),
    (torch.randn(2, 4), torch.tensor([0.0, 2.5]), "values", "2.5"),
    (torch.randn(2, 4), torch.tensor([0.0, float("nan")]), "values", "nan"),
    (torch.randn(2, 4), torch.tensor([True, False]), "values", "bool"),
    (torch.randn(2, 4), torch.tensor([0, 1, 2]), "values", "(3,)"),
    (torch.randn(2, 4), torch.tensor([[0], [1]]), "values", "(2, 1)"),
    (np.zeros((2, 4), dtype=np.float32), torch.tensor([0, 1]), "keys", "ndarray"),
]


@pytest.mark.parametrize("eviction", ["fifo", "reservoir", "class_balanced"])
@pytest.mark.parametrize(("keys", "values", "argument", "detail"), BAD_ADDS)
def test_add_rejects_and_leaves_memory_unchanged(
    eviction: str, keys: torch.Tensor, values: torch.Tensor, argument: str, detail: str
) -> None:
    memory = _filled(eviction)
    before = snapshot(memory)
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        memory.add(keys, values)
    assert detail in str(info.value)
    assert_same_state(snapshot(memory), before)


def test_empty_add_is_a_no_op() -> None:
    memory = _filled("reservoir")
    before = snapshot(memory)
    assert memory.add(torch.empty(0, 4), torch.empty(0, dtype=torch.long)).shape == (0,)
    assert_same_state(snapshot(memory), before)


@pytest.mark.parametrize(
    ("queries", "k", "argument"),
    [
        (torch.randn(2, 4), 0, "k"),
        (torch.randn(2, 4), -1, "k"),
        (torch.randn(2, 4), 2.0, "k"),
        (torch.randn(2, 3), 2, "queries"),
        (torch.randn(4), 2, "queries"),
        (torch.ones(2, 4, dtype=torch.long), 2, "queries"),
        (torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), 2, "queries"),
    ],
)
def test_search_rejects(queries: torch.Tensor, k: int, argument: str) -> None:
    memory = _filled()
    before = snapshot(memory)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        memory.search(queries, k)
    assert_same_state(snapshot(memory), before)


def _corrupt(name: str) -> dict:
    state = _filled("reservoir").state_dict()
    if name == "missing":
        del state["cursor"]
    elif name == "extra":
        state["bogus"] = torch.zeros(1)
    elif name == "capacity":
        state["capacity"] = torch.tensor(7)
    elif name == "dim":
        state["dim"] = torch.tensor(5)
    elif name == "truncated keys":
        state["keys"] = state["keys"][:-1]
    elif name == "truncated values":
        state["values"] = state["values"][:-2]
    elif name == "num_seen":
        state["num_seen"] = torch.tensor(3)
    elif name == "cursor":
        state["cursor"] = torch.tensor(5)
    elif name == "nan keys":
        state["keys"][0, 0] = float("nan")
    elif name == "negative values":
        state["values"][0] = -4
    elif name == "float64 keys":
        state["keys"] = state["keys"].double()
    elif name == "generator":
        state["generator_state"] = state["generator_state"][:100]
    elif name == "scalar dtype":
        state["num_seen"] = torch.tensor(8.0)
    elif name == "not a tensor":
        state["keys"] = state["keys"].tolist()
    return state


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("missing", "cursor"),
        ("extra", "bogus"),
        ("capacity", "capacity"),
        ("dim", "dim"),
        ("truncated keys", "keys"),
        ("truncated values", "values"),
        ("num_seen", "num_seen"),
        ("cursor", "cursor"),
        ("nan keys", "finite"),
        ("negative values", "non-negative"),
        ("float64 keys", "float32"),
        ("generator", "generator_state"),
        ("scalar dtype", "num_seen"),
        ("not a tensor", "keys"),
    ],
)
@pytest.mark.parametrize("index", ["Flat", "HNSW32"])
def test_load_state_dict_rejects_and_leaves_memory_unchanged(
    name: str, needle: str, index: str
) -> None:
    memory = EpisodicMemory(6, eviction="reservoir", index=index, seed=4)
    memory.add(*tagged(100, 9, d=4))
    before = snapshot(memory)
    q = torch.randn(3, 4)
    found_before = memory.search(q, 3)
    with pytest.raises(ValueError, match=needle):
        memory.load_state_dict(_corrupt(name))
    assert_same_state(snapshot(memory), before)
    found_after = memory.search(q, 3)
    assert torch.equal(found_before.indices, found_after.indices)


# ---------------------------------------------------------------------- devices and memory


def test_to_cpu_is_a_no_op_and_faiss_stays_on_cpu() -> None:
    memory = _filled()
    assert memory.to("cpu") is memory and memory.backend == "auto"  # exact, nothing searched yet
    memory.search(torch.randn(2, memory.dim), 3)  # too small to time: the torch kernel
    assert memory.backend == "torch"
    pinned = EpisodicMemory(6, backend="faiss")
    assert pinned.to("cuda").device.type == "cpu"


_RSS_PROBE = """
import json, sys
import torch
from lightning_mbpa.memory import EpisodicMemory

def rss():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) * 1024

chunk = torch.randn(1000, 512)
labels = torch.zeros(1000, dtype=torch.long)
before = rss()
memory = EpisodicMemory(250_000, dim=512)  # 512 MB of keys if every page were touched
memory.add(chunk, labels)
first = rss() - before
for _ in range(40):  # 40k more rows: 82 MB of keys that must become resident
    memory.add(chunk, labels)
json.dump({"first": first, "filled": rss() - before}, sys.stdout)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_resident_memory_grows_with_the_fill_not_the_capacity() -> None:
    """In a fresh process, so no earlier test's allocations blur the deltas."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    deltas = json.loads(out.stdout)
    key_bytes = 40_000 * 512 * 4
    assert deltas["first"] < 16 * 2**20  # 1000 rows (2 MB), not the 512 MB capacity
    assert 0.9 * key_bytes < deltas["filled"] < key_bytes + 32 * 2**20  # the fill, measured


@pytest.mark.gpu
@cuda
def test_cuda_storage_uses_the_torch_backend_and_matches_cpu() -> None:
    x, y = clustered(500, 16, seed=0)
    q, _ = clustered(9, 16, seed=1)
    cpu = EpisodicMemory(400)
    gpu = EpisodicMemory(400, device="cuda")
    assert gpu.backend == "torch"
    for memory in (cpu, gpu):
        memory.add(x, y)
    assert_same_state(cpu.state_dict(), gpu.state_dict())
    on_cpu = gpu.search(q, 7)
    assert on_cpu.keys.device.type == "cpu"
    on_gpu = gpu.search(q.cuda().half(), 7)
    assert on_gpu.keys.device.type == "cuda" and on_gpu.keys.dtype == torch.float16
    ref = cpu.search(q, 7)
    assert torch.equal(on_cpu.indices, ref.indices)
    torch.testing.assert_close(on_cpu.distances, ref.distances)
    assert_exact_knn(on_cpu, gpu.keys.cpu().numpy(), q.numpy(), 7)
    moved = EpisodicMemory(400)
    moved.add(x, y)
    moved.to("cuda")
    assert moved.backend == "torch" and moved.keys.is_cuda
    assert torch.equal(moved.search(q, 7).indices, ref.indices)
    moved.to("cpu")
    assert moved.backend == "torch" and not moved.keys.is_cuda
    restored = pickle.loads(pickle.dumps(gpu))
    assert restored.device.type == "cuda"
    assert torch.equal(restored.search(q, 7).indices, ref.indices)
