"""Settings: a schedule given in passes over the training images resolves to iterations when the images are known."""

import pytest

from cada.config import DEFAULT_METHOD, BaseTraining, Settings, preset


def test_epochs_resolve_to_enough_steps_for_every_image():
    schedule = BaseTraining(iters=None, epochs=20, batch_size=16)
    assert schedule.iterations(747) == 934  # ceil(20 x 747 / 16): the last pass is completed, not cut
    assert schedule.iterations(160) == 200 and schedule.iterations(1) == 2
    assert schedule.iterations(747, processes=2) == 467  # each step takes a batch in every process
    resolved = schedule.resolved(747)
    assert (resolved.iters, resolved.epochs, resolved.batch_size) == (934, None, 16)
    assert BaseTraining(iters=400).iterations(10_000) == 400  # a step count is taken as given
    assert BaseTraining(iters=None, epochs=20, min_iters=400).iterations(85) == 400  # a floor for small sets


def test_cpu_preset_encoders():
    assert preset("cpu").method == DEFAULT_METHOD == "revdist-patchcore"
    assert preset("cpu").backbone == preset("cpu", "revdist").backbone == "efficientnet_lite2"
    assert {preset("cpu", m).backbone for m in ("recontrast", "uniad", "patchcore", "draem", "cfa")} == {
        "efficientnet_lite0"
    }


def test_default_aligners_by_measurement():
    # knn-distance for RevDist; PatchCore keeps knn (docs/results/aligners.md: the distance term cost it on mix6);
    # the default method's map is normalised already, so it keeps only knn-distance's whole-image term
    assert Settings().align == preset("cpu", "revdist").align == preset("paper", "revdist").align == "knn-distance"
    assert preset("cpu").align == preset("paper").align == "distance-only"
    assert preset("cpu", "patchcore").align == preset("paper", "patchcore").align == "knn"


def test_cpu_preset_scales_large_mixes_and_keeps_small_ones_at_400_steps():
    for method in ("revdist", "recontrast", "uniad"):
        schedule = preset("cpu", method).base
        assert [schedule.iterations(n) for n in (85, 747, 800, 1207, 8659)] == [400, 400, 400, 604, 4330]
    for method in ("draem", "cfa"):  # their own small batches: a fixed budget
        assert preset("cpu", method).base.iterations(8659) == 400


def test_learning_rate_drops_need_the_resolved_schedule():
    schedule = BaseTraining(iters=None, epochs=10, batch_size=4, lr_drop_at=0.8)
    with pytest.raises(ValueError, match="resolve"):
        schedule.lr_milestones()
    assert schedule.resolved(40).lr_milestones() == [80]


@pytest.mark.parametrize(
    "iters, epochs, message",
    [
        (None, None, "exactly one of iters and epochs"),
        (400, 20, "exactly one of iters and epochs"),
        (None, 0, r"base.epochs must be .* in \(0, "),
        (None, -1.5, r"base.epochs must be .* in \(0, "),
    ],
)
def test_schedule_is_validated(iters, epochs, message):
    settings = Settings()
    settings.base.iters, settings.base.epochs = iters, epochs
    with pytest.raises(ValueError, match=message):
        settings.validate()


@pytest.mark.parametrize("name", ["cpu", "paper"])
@pytest.mark.parametrize("method", ["revdist", "recontrast", "uniad", "patchcore", "draem", "cfa"])
def test_every_preset_has_a_valid_schedule_that_survives_json(name, method):
    settings = preset(name, method).validate()
    assert Settings.from_dict(settings.to_dict()) == settings
    assert settings.base.iterations(3629) >= 1


def test_negative_step_floor_is_refused():
    settings = preset("cpu")
    settings.base.min_iters = -1
    with pytest.raises(ValueError, match="min_iters"):
        settings.validate()
