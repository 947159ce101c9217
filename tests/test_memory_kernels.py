"""Tests of the choice between the torch and faiss exact-search kernels (``backend="auto"``).

Timings are injected through ``_kernel_choice._measure``: no test depends on how fast anything
runs. Results are checked against numpy brute force (tests/reference.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import faiss
import numpy as np
import pytest
import torch

import lightning_mbpa._exact_search as _exact_search
import lightning_mbpa._kernel_choice as kernel_choice
from lightning_mbpa._exact_search import TorchExactSearch
from lightning_mbpa.memory import EpisodicMemory, forget_kernel_choices, kernel_choices
from tests.reference import brute_force

# 4096 keys x 64 x 128 queries = 2**25 multiply-adds: just enough work to calibrate.
N, D, B, K = 4096, 64, 128, 10


@pytest.fixture(autouse=True)
def no_decisions() -> Iterator[None]:
    forget_kernel_choices()
    yield
    forget_kernel_choices()


class Spy:
    """Counts the runs of each kernel and the number of keys each run searched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        real_knn, real_torch = _exact_search.faiss_exact_candidates, TorchExactSearch.candidates

        def knn(xq: np.ndarray, xb: np.ndarray, k: int, norms: np.ndarray) -> np.ndarray:
            self.calls.append(("faiss", xb.shape[0]))
            return real_knn(xq, xb, k, norms)

        def candidates(self_: TorchExactSearch, keys: torch.Tensor, *args: object) -> torch.Tensor:
            self.calls.append(("torch", keys.shape[0]))
            return real_torch(self_, keys, *args)

        monkeypatch.setattr(_exact_search, "faiss_exact_candidates", knn)
        monkeypatch.setattr(TorchExactSearch, "candidates", candidates)

    def kernels(self) -> Counter:
        return Counter(name for name, _ in self.calls)


def inject(monkeypatch: pytest.MonkeyPatch, torch_s: float, faiss_s: float) -> list[str]:
    """Makes every timed torch run take ``torch_s`` and faiss run ``faiss_s``; returns the log
    of timed kernels."""
    timed: list[str] = []

    def measure(kernel: str, run: Callable[[], object]) -> tuple[float, object]:
        timed.append(kernel)
        return {"torch": torch_s, "faiss": faiss_s}[kernel], run()

    monkeypatch.setattr(kernel_choice, "_measure", measure)
    return timed


def data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(B, D, generator=g)


def filled(n: int = N, backend: str = "auto") -> tuple[EpisodicMemory, torch.Tensor, torch.Tensor]:
    keys, queries = data(n)
    memory = EpisodicMemory(n, backend=backend)
    memory.add(keys, torch.arange(n))
    return memory, keys, queries


def assert_matches_brute_force(memory: EpisodicMemory, keys: torch.Tensor, q: torch.Tensor) -> None:
    found = memory.search(q, K)
    idx, dist = brute_force(keys.numpy(), q.numpy(), K)
    assert np.array_equal(found.indices.numpy(), idx)  # random data: no ties
    np.testing.assert_allclose(found.distances.numpy(), dist, rtol=1e-5, atol=1e-4)
    assert torch.equal(found.values, found.indices)  # labels are the slot numbers here


@pytest.mark.parametrize(
    ("torch_s", "faiss_s", "faster"), [(2.0, 1.0, "faiss"), (1.0, 2.0, "torch")]
)
def test_auto_uses_the_faster_kernel(monkeypatch, torch_s, faiss_s, faster) -> None:
    timed = inject(monkeypatch, torch_s, faiss_s)
    memory, keys, queries = filled()
    assert memory.backend == "auto"  # nothing decided before the first search
    spy = Spy(monkeypatch)
    assert_matches_brute_force(memory, keys, queries)
    repeats = kernel_choice.CALIBRATION_REPEATS
    assert Counter(timed) == {"torch": repeats, "faiss": repeats}
    assert timed[:2] == ["torch", "faiss"] and timed[2:4] == ["faiss", "torch"]  # alternating
    # The calibration covered every key: its last run of the faster kernel was the result.
    assert spy.kernels() == {"torch": repeats, "faiss": repeats}
    assert memory.backend == faster
    assert list(kernel_choices().values()) == [faster]

    spy.calls.clear()
    _, other = data(seed=1)
    assert_matches_brute_force(memory, keys, other)  # same bucket: no new calibration
    assert len(timed) == 2 * repeats
    assert spy.calls == [(faster, N)]


def test_decisions_are_cached_per_bucket_and_shared_by_memories(monkeypatch) -> None:
    timed = inject(monkeypatch, 2.0, 1.0)
    memory, _, queries = filled(4 * N)  # 4x the keys: 50 queries still calibrate
    memory.search(queries[:100], K)
    assert len(timed) == 4 and len(kernel_choices()) == 1
    twin, _, _ = filled(4 * N)  # another memory with the same shapes: the process-wide decision
    twin.search(queries[:120], 12)  # 100 and 120 queries, k 10 and 12: same powers of two
    assert len(timed) == 4
    memory.search(queries[:50], K)  # half the queries: a new bucket
    assert len(timed) == 8
    memory.search(queries[:100], 16)  # k in another power of two
    assert len(timed) == 12
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        memory.search(queries[:100], K)  # another thread count
    finally:
        torch.set_num_threads(threads)
    assert len(timed) == 16
    buckets = kernel_choices()
    assert len(buckets) == 4 and set(buckets.values()) == {"faiss"}
    smaller, _, _ = filled(2 * N)  # half the keys: another bucket
    smaller.search(queries[:100], K)
    assert len(timed) == 20


@pytest.mark.parametrize("faster", ["torch", "faiss"])
def test_results_are_identical_whichever_kernel_is_chosen(monkeypatch, faster) -> None:
    inject(monkeypatch, *((1.0, 2.0) if faster == "torch" else (2.0, 1.0)))
    memory, keys, queries = filled()
    chosen = memory.search(queries, K)
    assert memory.backend == faster
    for backend in ("torch", "faiss"):
        fixed, _, _ = filled(backend=backend)
        found = fixed.search(queries, K)
        for name in ("indices", "values", "keys", "distances", "mask"):
            assert torch.equal(getattr(found, name), getattr(chosen, name)), (backend, name)
    assert_matches_brute_force(memory, keys, queries)


def test_calibration_over_a_subset_of_the_keys(monkeypatch) -> None:
    """Above CALIBRATION_KEYS keys, both kernels are timed on the first keys only; the chosen
    one then searches all of them."""
    monkeypatch.setattr(kernel_choice, "CALIBRATION_KEYS", 1000)
    inject(monkeypatch, 2.0, 1.0)
    memory, keys, queries = filled()
    spy = Spy(monkeypatch)
    assert_matches_brute_force(memory, keys, queries)
    assert sorted(spy.calls) == [("faiss", 1000)] * 2 + [("faiss", N)] + [("torch", 1000)] * 2


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_given_backend_is_never_timed(monkeypatch, backend) -> None:
    timed = inject(monkeypatch, 1.0, 1.0)
    memory, keys, queries = filled(backend=backend)
    assert memory.backend == backend
    spy = Spy(monkeypatch)
    assert_matches_brute_force(memory, keys, queries)
    assert timed == [] and spy.calls == [(backend, N)] and kernel_choices() == {}


def test_small_searches_use_torch_without_timing(monkeypatch) -> None:
    timed = inject(monkeypatch, 2.0, 1.0)
    memory, keys, queries = filled()
    spy = Spy(monkeypatch)
    assert_matches_brute_force(memory, keys, queries[:127])  # just under 2**25 multiply-adds
    assert timed == [] and spy.calls == [("torch", N)] and memory.backend == "torch"


def test_approximate_indexes_always_use_faiss(monkeypatch) -> None:
    timed = inject(monkeypatch, 1.0, 2.0)
    memory = EpisodicMemory(N, index="HNSW32")
    assert memory.backend == "faiss"
    keys, queries = data()
    memory.add(keys, torch.arange(N))
    memory.search(queries, K)
    assert memory.backend == "faiss" and timed == []


def test_each_decision_is_logged_once_at_debug_level(monkeypatch, caplog) -> None:
    inject(monkeypatch, 2.0, 1.0)
    memory, _, queries = filled()
    with caplog.at_level(logging.DEBUG, logger="lightning_mbpa.memory"):
        memory.search(queries, K)
        memory.search(queries, K)
    records = [r for r in caplog.records if r.name == "lightning_mbpa.memory"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG
    message = records[0].getMessage()
    assert "faiss (torch 2000.00 ms, faiss 1000.00 ms" in message and f"{N} keys" in message


def test_concurrent_first_searches_calibrate_once(monkeypatch) -> None:
    timed = inject(monkeypatch, 2.0, 1.0)
    memory, keys, queries = filled()
    start = threading.Barrier(4)

    def search(seed: int) -> np.ndarray:
        start.wait()
        return memory.search(queries, K).indices.numpy()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = list(pool.map(search, range(4)))
    assert len(timed) == 2 * kernel_choice.CALIBRATION_REPEATS
    expected, _ = brute_force(keys.numpy(), queries.numpy(), K)
    assert all(np.array_equal(f, expected) for f in found)


def test_real_timings_choose_a_kernel_and_stay_exact() -> None:
    """Without injected timings: whichever kernel wins on this machine, results are exact and the
    decision is reported."""
    memory, keys, queries = filled()
    assert_matches_brute_force(memory, keys, queries)
    assert memory.backend in ("torch", "faiss")
    assert list(kernel_choices().values()) == [memory.backend]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_storage_keeps_the_torch_kernel(monkeypatch) -> None:
    timed = inject(monkeypatch, 2.0, 1.0)
    keys, queries = data()
    memory = EpisodicMemory(N, device="cuda")
    memory.add(keys, torch.arange(N))
    assert memory.backend == "torch"
    found = memory.search(queries.cuda(), K)
    idx, _ = brute_force(keys.numpy(), queries.numpy(), K)
    assert np.array_equal(found.indices.cpu().numpy(), idx)
    assert timed == [] and memory.backend == "torch"


def test_faiss_kernel_with_the_memory_norms_matches_faiss_knn_and_brute_force(monkeypatch) -> None:
    memory, keys, queries = filled(backend="faiss")
    store = memory._store
    assert store.keys is not None and store.norms is not None
    keys_np, norms_np = store.keys[:N].numpy(), store.norms[:N].numpy()
    with_norms = _exact_search.faiss_exact_candidates(queries.numpy(), keys_np, K, norms_np)
    without = _exact_search.faiss_exact_candidates(queries.numpy(), keys_np, K)
    _, knn_rows = faiss.knn(queries.numpy(), keys_np, K)
    idx, _ = brute_force(keys.numpy(), queries.numpy(), K)
    assert np.array_equal(with_norms, knn_rows) and np.array_equal(without, knn_rows)
    assert np.array_equal(with_norms, idx)  # random data: no ties
    # the memory hands faiss its cached norms (no pass over the keys per search)
    given: list[object] = []
    real = faiss.knn_L2sqr

    def spy(*args: object) -> object:
        given.append(args[8])
        return real(*args)

    monkeypatch.setattr(faiss, "knn_L2sqr", spy)
    assert_matches_brute_force(memory, keys, queries)
    assert len(given) == 1 and given[0] is not None
