"""Data-parallel calibration on ``torch.distributed``: each process runs its share of the calibration batches through
every layer, and the statistics are summed in exactly the order one process would sum them (docs/gpu.md "70B").

Every statistic the lab collects is a sum over calibration batches — Wanda's Σ_t x_tj², SparseGPT's and ADMM's
2 Σ_t x_t x_tᵀ — so the batches can be split between processes. Floating-point addition is not associative, though:
adding each process's partial sum at the end (an all-reduce) gives slightly different statistics from one process,
and now and then a different mask. So the sum is passed along instead, batch by batch, in the single-process order:

- batch b belongs to rank b mod R (round robin), so consecutive batches are on different ranks;
- after computing batch b's term, its rank receives the running sum of batches 0 … b−1 from the rank of batch b−1,
  adds its term (one float addition per element, as one process does) and sends the new running sum on, without
  waiting for it to arrive (``isend``), to the rank of batch b+1, then computes its next batch;
- the rank of the last batch holds the total and broadcasts it to every rank.

The result is bit for bit the single process's statistic, so the masks (and SparseGPT's updates) are identical.
The ranks proceed in lock step, each computing its own batches while the others compute theirs: the forward
passes, which are nearly all the time, run in parallel; the additions are a few vector operations per batch.
Memory: one extra copy of each statistic per rank (the running sum beside the batch's term).

Launch with ``torchrun --nproc-per-node N -m labutils prune --data-parallel …``: gloo on CPUs, NCCL on GPUs (each
rank on cuda:LOCAL_RANK), the same code. Every rank holds the whole model (or streams it from disk) and prunes it
identically; rank 0 evaluates and writes. When one rank fails, torchrun stops the others.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.errors import BadInput, LabError

TIMEOUT = datetime.timedelta(hours=2)  # a rank waits this long for another (rank 0 evaluates while others wait)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among ``world`` processes that share the calibration batches round robin."""

    rank: int
    world: int

    def owner(self, batch: int) -> int:
        """The rank that runs global batch ``batch``."""
        return batch % self.world

    def owns(self, batch: int) -> bool:
        return self.owner(batch) == self.rank

    @property
    def leader(self) -> bool:
        """Rank 0: the process that evaluates, writes the output and prints."""
        return self.rank == 0


def launched_ranks() -> int:
    """WORLD_SIZE as torchrun (or accelerate launch) sets it; 1 when started as one plain process."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise BadInput(f"WORLD_SIZE={value!r} is not a process count; launch with torchrun --nproc-per-node N")
    return int(value)


def start_data_parallel(device: torch.device) -> tuple[DataParallel, torch.device]:
    """Join the process group torchrun set up (gloo for CPUs, NCCL for GPUs) and return this process's place and
    its device (cuda:LOCAL_RANK on GPUs). BadInput when not launched by torchrun with at least 2 processes."""
    world = launched_ranks()
    if world < 2 or "RANK" not in os.environ:
        raise BadInput(f"--data-parallel needs several processes (WORLD_SIZE={world}): launch with torchrun "
                       "--nproc-per-node 2 -m labutils prune --data-parallel …")
    rank = os.environ["RANK"]
    if not rank.isdigit() or int(rank) >= world:
        raise BadInput(f"RANK={rank!r} is not a process number below WORLD_SIZE={world}; launch with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise BadInput(f"WORLD_SIZE and RANK are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                       "not: the processes cannot meet; launch with torchrun, which sets them all")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return DataParallel(dist.get_rank(), dist.get_world_size()), device


def with_peers(call, *args, **kwargs):
    """``call(*args, **kwargs)`` — a send, receive or collective — with a clear LabError when another rank is gone
    (gloo: "Connection reset by peer"; NCCL: a DistBackendError; either after the timeout when it hangs)."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LabError(f"stopped because another rank failed or went away (its own error is above; torchrun names "
                       f"it): {detail[:200]}; nothing was published") from exc


def stop_data_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_ranks_agree(parallel: DataParallel | None, value: str, what: str) -> None:
    """LabError on every rank unless every rank computed the same ``value`` (a mask hash): the ranks prune their
    own copies of the model, which must stay identical."""
    if parallel is None:
        return
    values = [None] * parallel.world
    with_peers(dist.all_gather_object, values, value)
    if len(set(values)) > 1:
        raise LabError(f"the ranks disagree on {what} ({', '.join(f'rank {r}: {v[:12]}' for r, v in enumerate(values))})"
                       ": their computations are not deterministic; run on one process")


class OrderedSum:
    """Sums per-batch statistics across ranks in global batch order (module docstring). ``stats``: name → the
    tensor the hooks add one batch's term into (zero before each batch; it holds the total after ``finish``)."""

    def __init__(self, stats: dict[str, torch.Tensor], parallel: DataParallel, batch_ids: list[int], n_batches: int):
        self.stats, self.parallel = stats, parallel
        self.batch_ids, self.n_batches = batch_ids, n_batches
        self.running: dict[str, torch.Tensor] = {}
        self._sends: list = []  # (tensor, work): each tensor must live until its send is done

    def batch_done(self, local: int) -> None:
        """Fold the term of this rank's ``local``-th batch into the running sum, in global order."""
        batch = self.batch_ids[local]
        if batch == 0:
            running = {name: s.clone() for name, s in self.stats.items()}  # 0 + t₀, as one process starts
        else:
            source = self.parallel.owner(batch - 1)
            running = {}
            for name, term in self.stats.items():
                received = torch.empty_like(term)
                with_peers(dist.recv, received, src=source)
                running[name] = received.add_(term)
        for term in self.stats.values():
            term.zero_()
        if batch + 1 < self.n_batches:
            target = self.parallel.owner(batch + 1)
            self._sends += [(t, with_peers(dist.isend, t, dst=target)) for t in running.values()]
        self.running = running

    def finish(self, routed: dict[str, int]) -> dict[str, int]:
        """Every rank's ``stats`` become the total; returns the summed token counts of routed experts."""
        for _, work in self._sends:
            with_peers(work.wait)
        self._sends.clear()
        last = self.parallel.owner(self.n_batches - 1) if self.n_batches else 0
        for name, total in self.stats.items():
            if self.parallel.rank == last and self.running:
                total.copy_(self.running[name])
            with_peers(dist.broadcast, total, src=last)
        self.running = {}
        if not routed:
            return {}
        counts = torch.tensor(list(routed.values()), dtype=torch.int64,
                              device=next(iter(self.stats.values())).device)
        with_peers(dist.all_reduce, counts)  # integers: the order of addition does not matter
        return dict(zip(routed, counts.tolist()))
