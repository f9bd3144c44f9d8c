"""Exact neighbour lists across the ranks of a torchrun / `accelerate launch` job: a share of the query rows each.

Rank 0 runs the graph build; every other rank waits in `serve` for its requests. A request broadcasts the
base rows (and the query rows when they differ), each rank runs `exact_topk` on its own share of the queries
on its own device (cuda:LOCAL_RANK on GPUs), and the shares are gathered on every rank. `exact_topk`'s lists
do not depend on how queries are blocked nor on the device (candidates come from float32 products, weights and
order from the fixed-order float64 re-score), so the gathered lists equal a single process's bit for bit.
Memory per rank: the base rows once on the host and once on the device, as in a single-process exact search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from g2is_graph.distributed import Ranks, process_group, rank_device, ranks_from_env
from g2is_graph.errors import ConfigError
from g2is_graph.neighbors.knn import Neighbors, exact_topk

PIECE_BYTES = 256 * 2**20  # rows are broadcast this many bytes at a time (gloo and NCCL both take any size;
# pieces bound the device copy a broadcast needs on the way)

T = TypeVar("T")


def share(n: int, ranks: Ranks, rank: int | None = None) -> tuple[int, int]:
    """Rows [start, stop) of n that `rank` (default: this one) computes: contiguous, sizes differ by at most one."""
    r = ranks.rank if rank is None else rank
    return r * n // ranks.world_size, (r + 1) * n // ranks.world_size


def _comm_device(device: str) -> torch.device:
    """Where tensors must be for the process group's backend: the rank's GPU for NCCL, the host for gloo."""
    import torch.distributed as dist

    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast_array(array: np.ndarray | None, shape: tuple[int, ...], dtype, device: str) -> np.ndarray:
    """Rank 0's `array` on every rank, sent in pieces of rows; other ranks pass None and get a new array."""
    import torch.distributed as dist

    out = np.ascontiguousarray(array, dtype=dtype) if array is not None else np.empty(shape, dtype=dtype)
    comm = _comm_device(device)
    row_bytes = max(1, out[:1].nbytes)
    step = max(1, PIECE_BYTES // row_bytes)
    for start in range(0, len(out), step):
        piece = torch.from_numpy(out[start:start + step]).to(comm)
        dist.broadcast(piece, src=0)
        if array is None:
            out[start:start + step] = piece.cpu().numpy()
    return out


def _gather_rows(local: np.ndarray, n: int, ranks: Ranks, device: str) -> np.ndarray:
    """Every rank's [share, k] rows, concatenated in rank order into [n, k] (on every rank)."""
    import torch.distributed as dist

    comm = _comm_device(device)
    widest = -(-n // ranks.world_size)
    padded = np.zeros((widest, *local.shape[1:]), dtype=local.dtype)
    padded[:len(local)] = local
    tensor = torch.from_numpy(padded).to(comm)
    parts = [torch.empty_like(tensor) for _ in range(ranks.world_size)]
    dist.all_gather(parts, tensor)
    pieces = []
    for r, part in enumerate(parts):
        start, stop = share(n, ranks, r)
        pieces.append(part[:stop - start].cpu().numpy())
    return np.concatenate(pieces)


def _search(ranks: Ranks, device: str, header: dict, base: np.ndarray, queries: np.ndarray,
            exclude: np.ndarray | None, keys: np.ndarray) -> Neighbors:
    start, stop = share(len(queries), ranks)
    mine = exact_topk(queries[start:stop], base, header["k"], None if exclude is None else exclude[start:stop],
                      device=device, keys=keys)
    return Neighbors(*(_gather_rows(getattr(mine, f), len(queries), ranks, device)
                       for f in Neighbors.__dataclass_fields__))


def _receive(device: str, header: dict, base=None, queries=None, exclude=None, keys=None):
    """One request's arrays on every rank (rank 0 passes them, the others get copies)."""
    d = header["dim"]
    base = _broadcast_array(base, (header["n_base"], d), np.float32, device)
    if header["queries_are_base"]:
        queries = base
    else:
        queries = _broadcast_array(queries, (header["n_queries"], d), np.float32, device)
    if header["exclude"]:
        exclude = _broadcast_array(exclude, (header["n_queries"],), np.int64, device)
    keys = _broadcast_array(keys, (header["n_base"],), np.int64, device)
    return base, queries, exclude, keys


class RankedSearch:
    """`exact_topk` for rank 0 of a launched job, spread over every rank; `close` (or leaving the `with`) lets the
    other ranks' `serve` return."""

    def __init__(self, ranks: Ranks, device: str):
        self.ranks, self.device, self._closed = ranks, device, False

    def exact_topk(self, queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
                   keys: np.ndarray | None = None) -> Neighbors:
        import torch.distributed as dist

        header = {"op": "exact", "k": int(k), "n_base": len(base), "n_queries": len(queries),
                  "dim": int(base.shape[1]), "queries_are_base": queries is base, "exclude": exclude is not None}
        dist.broadcast_object_list([header], src=0)
        keys = np.arange(len(base)) if keys is None else keys
        arrays = _receive(self.device, header, base, queries, exclude, keys)
        return _search(self.ranks, self.device, header, *arrays)

    def close(self) -> None:
        import torch.distributed as dist

        if not self._closed:
            self._closed = True
            dist.broadcast_object_list([{"op": "done"}], src=0)

    def __enter__(self) -> "RankedSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(ranks: Ranks, device: str) -> None:
    """Answer rank 0's requests until it is done."""
    import torch.distributed as dist

    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        header = message[0]
        if header["op"] == "done":
            return
        _search(ranks, device, header, *_receive(device, header))


def with_launched_search(exact: bool, device: str, body: Callable[[RankedSearch | None], T]) -> T | None:
    """Run `body` as the job wants it: one process calls body(None); under torchrun / accelerate launch rank 0
    calls body(search) with a RankedSearch over every rank and the other ranks serve it (returning None).
    Only exact search is spread (an index or cells trained on each rank would differ by device and BLAS)."""
    ranks = ranks_from_env()
    if not ranks.distributed:
        return body(None)
    if not exact:
        raise ConfigError(f"launched with WORLD_SIZE={ranks.world_size}: only exact search is spread over the ranks "
                          "(each computes a share of the rows); pass --exact, or run the build as one process")
    rank_dev = rank_device(ranks, device)
    with process_group(ranks, rank_dev):
        if not ranks.is_main:
            serve(ranks, rank_dev)
            return None
        with RankedSearch(ranks, rank_dev) as search:
            return body(search)
