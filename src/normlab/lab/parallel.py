"""Data-parallel training for the lab: ``K`` processes on one machine, gloo, one global batch.

:func:`fit_parallel` spawns ``nproc`` processes (``torch.multiprocessing``), joins them in a
gloo process group, and runs :func:`normlab.lab.train.fit` on each with ``shard=(rank, nproc)``:
every rank draws the same global batches, takes its rows, and gradients are averaged over ranks.
With the model's BatchNorms converted by :func:`normlab.distributed.convert_sync_batchnorm`,
training is the single-process training on the global batch; without, each BatchNorm sees only
its rank's share of the batch — the situation SyncBatchNorm exists for.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..distributed import convert_sync_batchnorm
from . import train
from .data import Split

__all__ = ["fit_parallel"]


def _worker(rank: int, nproc: int, folder: str, build, split: Split, sync: bool, fit_kwargs: dict) -> None:
    torch.set_num_threads(1)  # K processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=rank, world_size=nproc)
    try:
        model = build()
        if sync:
            model = convert_sync_batchnorm(model)
        history = train.fit(model, split, shard=(rank, nproc), progress=False, **fit_kwargs)
        if rank == 0:
            torch.save({"history": history.to_dict(), "state": model.state_dict()}, os.path.join(folder, "out.pt"))
        dist.barrier()  # every rank leaves the group together: none tears it down under another
    finally:
        dist.destroy_process_group()
    _exit_done()


def _exit_done() -> None:
    """End a finished worker without the interpreter's teardown: a spawned process that used gloo
    was seen, under load, to abort in its exit-time destructors after all its work had succeeded
    ("terminate called without an active exception", SIGABRT). Its output is flushed first; an
    error raised before this point still reaches ``mp.spawn`` as usual."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fit_parallel(build: Callable[[], nn.Module], split: Split, nproc: int, *, sync_batchnorm: bool = True,
                 **fit_kwargs) -> tuple[train.History, dict]:
    """Train ``build()`` on ``split`` with ``nproc`` processes; returns rank 0's history and
    ``state_dict``. ``build`` must be picklable (a module-level function or a ``functools.partial``
    of one) and build the same model on every rank (pass a ``seed``). ``batch_size`` is the
    global batch; it must be divisible by ``nproc``."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    batch = fit_kwargs.get("batch_size", 64)
    if batch % nproc:
        raise ValueError(f"batch_size={batch} must be divisible by nproc={nproc} (each process takes an equal share)")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(nproc, folder, build, split, sync_batchnorm, fit_kwargs), nprocs=nproc, join=True)
        out = torch.load(os.path.join(folder, "out.pt"), weights_only=True)
    history = train.History(**out["history"])
    return history, out["state"]
