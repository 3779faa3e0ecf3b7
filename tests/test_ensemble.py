"""The lab's stacked training: S random seeds trained at once must be the S runs trained alone."""

import copy
import math

import pytest
import torch
from torch import nn

from normlab.diagnostics import GlorotMonitor
from normlab.lab import data, models, train
from normlab.lab.ensemble import Stack, stackable

SEEDS = (0, 3, 7)


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", seed=0).scaled("zscore")


@pytest.fixture(scope="module")
def regression():
    return data.make_regression(num_examples=200, seed=0)


def _same_runs(alone, together, h_alone, h_together, tol=1e-5):
    for a, b in zip(h_alone, h_together):
        for key in ("train_loss", "test_loss", "train_metric", "test_metric", "batch_loss"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=tol, abs=tol), key
        assert a.steps == b.steps and a.diverged == b.diverged
    for a, b in zip(alone, together):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("norm", models.NORMS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_seeds_trained_together_follow_the_runs_they_would_have_alone(norm, task, digits, regression):
    split = digits if task == "classification" else regression

    def build(seed):
        return models.mlp(split.num_features, 10 if task == "classification" else 1, depth=3, width=16,
                          activation="tanh", norm=norm, seed=seed)

    alone, together = [build(s) for s in SEEDS], [build(s) for s in SEEDS]
    # one norm under Adam too; Adam divides by √v, so rounding in a tiny gradient moves a weight by
    # up to lr: its rate is kept small enough that rounding stays rounding (torch's float32 route too)
    adam = norm == "rms"
    kw = dict(epochs=2, lr=0.01 if adam else 0.05, batch_size=32, drop_last=True, optimizer="adam" if adam else "sgd",
              momentum=0.0)
    h_alone = [train.fit(m, split, seed=s, **kw) for m, s in zip(alone, SEEDS)]
    h_together = train.fit_seeds(together, split, SEEDS, **kw)
    _same_runs(alone, together, h_alone, h_together)


@pytest.mark.parametrize("norm", ["none", "batch", "group", "layer", "instance", "rms", "weight"])
def test_a_stack_of_cnns_computes_each_member(norm):
    nets = [models.cnn(10, channels=(4, 8), norm=norm, seed=s) for s in SEEDS]
    if norm == "weight":  # not stacked: fit_seeds trains such networks one at a time
        assert "weight-normed Conv2d" in stackable(nets)
        return
    stack = Stack(nets)
    x = torch.randn(6, 1, 8, 8)
    for training in (True, False):
        stack.train(training)
        out = stack.split(stack(stack.spread(x)))
        for s, net in enumerate(nets):
            net.train(training)
            torch.testing.assert_close(out[:, s], net(x), rtol=1e-5, atol=1e-5)


def test_a_stack_of_cnns_trains_each_member_as_alone():
    split = data.load_dataset("digits", seed=0, images=True).scaled("zscore")
    alone = [models.cnn(10, channels=(4, 8), norm="batch", seed=s) for s in SEEDS]
    together = copy.deepcopy(alone)
    kw = dict(epochs=1, lr=0.05, batch_size=64, drop_last=True)
    _same_runs(alone, together, [train.fit(m, split, seed=s, **kw) for m, s in zip(alone, SEEDS)],
               train.fit_seeds(together, split, SEEDS, **kw))


def test_write_back_gives_the_members_the_trained_weights_and_running_statistics():
    nets = [models.mlp(4, 2, depth=2, width=8, norm="batch", seed=s) for s in SEEDS]
    before = [copy.deepcopy(n.state_dict()) for n in nets]
    stack = Stack(nets)
    for p in stack.parameters():
        p.data.add_(1.0)
    stack.train()
    stack(stack.spread(torch.randn(16, 4)))  # running statistics move
    for net, old in zip(nets, before):  # nothing written before write_back
        for k, v in net.state_dict().items():
            assert torch.equal(v, old[k])
    stack.write_back()
    for s, net in enumerate(nets):
        again = Stack([net]).layers
        for i, layer in enumerate(stack.layers):
            for (k, a), (_, b) in zip(layer.state_dict().items(), again[i].state_dict().items()):
                torch.testing.assert_close(b, a if k.endswith("num_batches_tracked") else a.chunk(len(nets))[s])


def test_a_network_the_stack_does_not_know_is_trained_alone_with_the_same_hooks(digits):
    def build(seed):
        net = models.mlp(64, 10, depth=2, width=16, seed=seed)
        net.insert(2, nn.Dropout(0.2))  # random: each run draws from its own seed
        return net

    nets = [build(s) for s in SEEDS]
    assert "Dropout" in stackable(nets)
    alone, together = [build(s) for s in SEEDS], copy.deepcopy(nets)
    seen = []
    kw = dict(epochs=1, lr=0.05, batch_size=32, drop_last=True)
    h_alone = [train.fit(m, digits, seed=s, **kw) for m, s in zip(alone, SEEDS)]
    h_together = train.fit_seeds(together, digits, SEEDS, on_epoch=lambda e, st, hs: seen.append(st.offset), **kw)
    _same_runs(alone, together, h_alone, h_together)
    assert seen == [0, 1, 2]


def test_one_member_diverging_leaves_the_others_as_they_would_be(regression):
    def build(seed):
        return models.mlp(2, 1, depth=2, width=8, activation="relu", seed=seed)

    alone, together = [build(s) for s in SEEDS], [build(s) for s in SEEDS]
    with torch.no_grad():
        together[1][0].weight.fill_(math.inf)
    kw = dict(epochs=3, lr=0.01, batch_size=20)
    h_alone = [train.fit(m, regression, seed=s, **kw) for m, s in zip(alone, SEEDS)]
    h_together = train.fit_seeds(together, regression, SEEDS, **kw)
    assert h_together[1].diverged and len(h_together[1].test_loss) == 1
    _same_runs([alone[0], alone[2]], [together[0], together[2]], [h_alone[0], h_alone[2]],
               [h_together[0], h_together[2]])


def test_the_gradient_recorders_see_each_member_as_alone(regression):
    nets = [models.mlp(2, 1, depth=3, width=4, activation="sigmoid", seed=s) for s in SEEDS]
    alone = copy.deepcopy(nets)
    rec = train.SeedGradients({1, 2})
    watch = []

    def on_step(step, stack, losses):
        rec.on_step(step, stack, losses)
        if not watch:
            watch.append(stack.watch_backward())

    train.fit_seeds(nets, regression, SEEDS, epochs=2, lr=0.05, batch_size=20, on_step=on_step)
    watch[0].remove()
    for s, net in enumerate(alone):
        r = train.GradientRecorder(net, {1, 2})
        monitor = []
        train.fit(net, regression, epochs=2, lr=0.05, batch_size=20, seed=SEEDS[s],
                  on_step=lambda *a: (r.on_step(*a), monitor or monitor.append(GlorotMonitor(net))),
                  on_epoch=r.on_epoch)
        r.remove()
        monitor[0].remove()
        for epoch in (1, 2):
            mine, theirs = rec.layers(epoch, s), r.layers(epoch)
            assert mine.keys() == theirs.keys()
            for k in mine:
                torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-7)
        expected = [st["backward_var"] for st in monitor[0].stats()]
        assert watch[0].variances()[s] == pytest.approx(expected, rel=1e-4)


def test_members_of_different_architectures_are_refused():
    why = stackable([models.mlp(2, 1, width=4), models.mlp(2, 1, width=4, norm="batch")])
    assert "differ" in why
