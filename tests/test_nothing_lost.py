"""A refused call changes nothing and every route refuses it alike: each module holding state,
each kind of bad input, training and eval, on every backend; and normlab refuses what torch's
module refuses, with an error torch's callers catch (a subclass of torch's error class, where
torch's is ValueError or RuntimeError)."""


import pytest
import torch

import normlab
import normlab.nn as nln
from normlab.distributed import SyncBatchNorm

MODULES = {  # name: (normlab's, torch's or None, input rank)
    "BatchNorm1d": (lambda: nln.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), 2),
    "BatchNorm2d": (lambda: nln.BatchNorm2d(3), lambda: torch.nn.BatchNorm2d(3), 4),
    "BatchNorm2d momentum None": (lambda: nln.BatchNorm2d(3, momentum=None),
                                  lambda: torch.nn.BatchNorm2d(3, momentum=None), 4),
    "BatchRenorm2d": (lambda: nln.BatchRenorm2d(3), None, 4),
    "InstanceNorm2d with statistics": (lambda: nln.InstanceNorm2d(3, affine=True, track_running_stats=True),
                                       lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True), 4),
    "SyncBatchNorm": (lambda: SyncBatchNorm(3), lambda: torch.nn.SyncBatchNorm(3), 4),
    "GroupNorm": (lambda: nln.GroupNorm(1, 3), lambda: torch.nn.GroupNorm(1, 3), 4),
    "LayerNorm": (lambda: nln.LayerNorm(3), lambda: torch.nn.LayerNorm(3), 2),
    "RMSNorm": (lambda: nln.RMSNorm(3), lambda: torch.nn.RMSNorm(3), 2),
}


def _bad(rank: int) -> dict:
    good = torch.randn(4, 3, 2, 2) if rank == 4 else torch.randn(4, 3)
    return {
        "wrong channels": torch.randn(4, 5, 2, 2) if rank == 4 else torch.randn(4, 5),
        "wrong rank": torch.randn(3),
        "one value per channel": torch.randn(1, 3, 1, 1) if rank == 4 else torch.randn(1, 3),
        "integers": good.long(),
        "bool": good > 0,
        "float64 input, float32 parameters": good.double(),
        "empty batch": good[:0],
    }


def _prepared(make, rank, training):
    m = make()
    m.train()
    m(torch.randn(4, 3, 2, 2) if rank == 4 else torch.randn(4, 3))  # running statistics that moved
    return m.train(training)


def _outcome(m, x):
    try:
        m(x)
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        return e
    return None


CASES = [(name, training, what) for name, (_, _, rank) in MODULES.items() for training in (True, False)
         for what in _bad(rank)]


@pytest.mark.parametrize("name, training, what", CASES, ids=[f"{n}-{'train' if t else 'eval'}-{w}" for n, t, w in CASES])
def test_a_refused_call_changes_nothing_and_every_route_agrees_with_torch(name, training, what):
    make, make_torch, rank = MODULES[name]
    x = _bad(rank)[what]
    seen = {}
    for backend in ("auto", "torch", "reference"):
        m = _prepared(make, rank, training)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with normlab.use_backend(backend):
            err = _outcome(m, x)
        seen[backend] = None if err is None else (type(err), str(err))
        if err is not None:
            assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), (backend, err)
    assert len(set(seen.values())) == 1, seen
    if make_torch is not None:
        theirs = _outcome(_prepared(make_torch, rank, training), x)
        if isinstance(theirs, IndexError):  # torch's InstanceNorm with statistics fails on an empty batch
            return
        ours = seen["auto"]
        assert (theirs is None) == (ours is None), (theirs, ours)
        if theirs is not None:
            caught = ValueError if isinstance(theirs, ValueError) else RuntimeError
            assert issubclass(ours[0], caught), (type(theirs), ours)
