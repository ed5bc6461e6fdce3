"""The ABS/ABSA controller on scripted eigenvalue sequences: growth, patience, caps, lr, FGSM fraction, state."""

from __future__ import annotations

import json

import pytest

from secondorder.schedules import AdaptiveBatchSize


def feed(c: AdaptiveBatchSize, eigenvalues):
    return [c.step(e) for e in eigenvalues]


def test_doubles_when_the_eigenvalue_halved_since_the_last_increase():
    c = AdaptiveBatchSize(128, 0.1, patience=None)
    assert (c.batch_size, c.lr, c.needs_eigenvalue) == (128, 0.1, True)
    d = feed(c, [10.0, 6.0, 5.0, 3.0, 2.6, 2.5])
    assert [x.batch_size for x in d] == [128, 128, 256, 256, 256, 512]
    assert [x.reason for x in d] == ["", "", "eigenvalue", "", "", "eigenvalue"]
    assert [x.reference_eigenvalue for x in d] == [10.0, 10.0, 5.0, 5.0, 5.0, 2.5]
    assert [x.lr for x in d] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2, 0.4], rel=1e-15)
    assert [x.epoch for x in d] == [1, 2, 3, 4, 5, 6] and d[2].increased and not d[3].increased


def test_ratio_and_growth_are_parameters():
    c = AdaptiveBatchSize(100, 1.0, ratio=4.0, growth=3, patience=None)
    d = feed(c, [8.0, 2.5, 2.0, 0.5])
    assert [x.batch_size for x in d] == [100, 100, 300, 900]
    assert d[-1].lr == pytest.approx(9.0)


def test_patience_forces_growth_and_keeps_the_reference():
    c = AdaptiveBatchSize(128, 0.1, patience=3)
    d = feed(c, [10.0, 9.0, 8.0])  # three measured epochs without a halving
    assert [x.batch_size for x in d] == [128, 128, 256] and d[-1].reason == "patience"
    assert d[-1].reference_eigenvalue == 10.0  # HessianFlow leaves it after a forced increase
    d = feed(c, [5.0])  # halved relative to the kept reference of 10
    assert d[0].batch_size == 512 and d[0].reason == "eigenvalue" and d[0].reference_eigenvalue == 5.0
    d = feed(c, [6.0, 7.0, 6.0])
    assert [x.batch_size for x in d] == [512, 512, 1024] and d[-1].reason == "patience"


def test_the_cap_stops_measurements_and_adversarial_examples():
    c = AdaptiveBatchSize(128, 0.1, max_batch_size=300, adversarial_fraction=0.2, patience=None)
    d = feed(c, [8.0, 4.0])
    assert d[-1].batch_size == 256 and d[-1].adversarial_fraction == pytest.approx(0.1)
    d = c.step(2.0)
    assert d.batch_size == 300 and d.lr == pytest.approx(0.1 * 300 / 128)  # linear in the actual growth
    assert not d.needs_eigenvalue and not c.needs_eigenvalue and d.adversarial_fraction == 0.0
    d = c.step()  # no eigenvalue needed any more
    assert (d.batch_size, d.increased, d.adversarial_fraction) == (300, False, 0.0)
    assert c.step(0.001).batch_size == 300  # an eigenvalue given anyway is recorded, not used


def test_lr_milestones_max_lr_and_warmup():
    c = AdaptiveBatchSize(128, 0.1, lr_milestones=(2, 4), lr_decay=0.5, max_lr=0.3, patience=1)
    d = feed(c, [1.0] * 5)  # patience 1: the batch doubles every epoch
    assert [x.batch_size for x in d] == [256, 512, 1024, 2048, 4096]
    assert [x.lr for x in d] == pytest.approx([0.2, 0.3 * 0.5, 0.3 * 0.5, 0.3 * 0.25, 0.3 * 0.25], rel=1e-15)
    fixed = AdaptiveBatchSize(2048, 1.6, max_batch_size=2048, adaptive=False, warmup_epochs=4, lr_milestones=(6,))
    lrs = [fixed.lr] + [fixed.step().lr for _ in range(7)]
    assert lrs == pytest.approx([0.4, 0.8, 1.2, 1.6, 1.6, 1.6, 0.32, 0.32], rel=1e-15)
    assert not fixed.needs_eigenvalue and fixed.batch_size == 2048


def test_adversarial_fraction_halves_with_each_growth_and_stops_after_its_epochs():
    c = AdaptiveBatchSize(128, 0.1, adversarial_fraction=0.2, adversarial_epochs=4, patience=1)
    assert c.adversarial_fraction == 0.2
    d = feed(c, [1.0] * 5)
    assert [x.adversarial_fraction for x in d] == pytest.approx([0.1, 0.05, 0.025, 0.0, 0.0])
    fixed = AdaptiveBatchSize(128, 0.1, max_batch_size=128, adaptive=False, adversarial_fraction=0.3,
                              adversarial_epochs=2)
    assert [fixed.step().adversarial_fraction for _ in range(3)] == [0.3, 0.0, 0.0]


def test_state_dict_round_trip_resumes_the_same_decisions():
    seq = [10.0, 9.0, 4.0, 4.5, 3.0, 1.9, 2.0, 2.0, 2.0, 0.5, 0.1]
    settings = dict(max_batch_size=4096, adversarial_fraction=0.2, adversarial_epochs=8, patience=3,
                    lr_milestones=(6,), max_lr=1.0)
    whole = feed(AdaptiveBatchSize(128, 0.1, **settings), seq)
    first = AdaptiveBatchSize(128, 0.1, **settings)
    head = feed(first, seq[:5])
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON
    second = AdaptiveBatchSize(128, 0.1, **settings)
    second.load_state_dict(state)
    assert second.current().batch_size == head[-1].batch_size and second.state_dict() == first.state_dict()
    assert head + feed(second, seq[5:]) == whole
    other = AdaptiveBatchSize(128, 0.1, **{**settings, "patience": 4})
    with pytest.raises(ValueError, match="patience=3"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not an AdaptiveBatchSize state_dict"):
        other.load_state_dict({"epoch": 1})


def test_missing_or_bad_eigenvalues_are_refused():
    c = AdaptiveBatchSize()
    with pytest.raises(ValueError, match="needs the top Hessian eigenvalue"):
        c.step()
    for bad in (float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match="finite number"):
            c.step(bad)
    assert c.epoch == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_batch_size=0), "base_batch_size must be a positive integer"),
    (dict(base_batch_size=256, max_batch_size=128), "max_batch_size"),
    (dict(base_lr=-1.0), "base_lr must be a positive"),
    (dict(ratio=1.0), "ratio must exceed 1"),
    (dict(growth=1), "growth must be an integer >= 2"),
    (dict(patience=0), "patience must be a positive integer"),
    (dict(adversarial_fraction=1.5), r"adversarial_fraction must lie in \[0, 1\]"),
    (dict(adversarial_epochs=-1), "adversarial_epochs"),
    (dict(lr_milestones=(0,)), "lr milestone"),
    (dict(lr_decay=0.0), "lr_decay"),
    (dict(max_lr=0.0), "max_lr"),
    (dict(warmup_epochs=-2), "warmup_epochs"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveBatchSize(**kwargs)
