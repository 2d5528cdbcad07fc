"""Which checkpoint a run wrote last."""
import logging

import pytest

from training.checkpoint import checkpoints_to_come, latest_checkpoint


def test_the_last_checkpoint_is_the_highest_epoch_not_the_last_name(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ("model_epoch_010.pth", "model_epoch_999.pth", "model_epoch_1000.pth", "model_epoch_020.pth.tmp",
                 "model_epoch_best.pth"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "model_epoch_1000.pth"  # by name, 999 came last


@pytest.mark.parametrize("epoch, num_epochs, interval, expected", [
    (1, 120, 1, 119), (10, 120, 10, 11), (10, 125, 10, 12), (120, 120, 10, 0), (5, 7, 5, 1), (3, 3, 5, 0)])
def test_checkpoints_to_come_counts_the_intervals_and_the_last(epoch, num_epochs, interval, expected):
    assert checkpoints_to_come(epoch, num_epochs, interval) == expected


def test_a_run_whose_checkpoints_will_not_fit_is_warned_at_its_first(quick_spec, tmp_path, monkeypatch, caplog):
    """A run that checkpoints every epoch filled the disk tens of epochs in, with no word before."""
    import collections
    import shutil

    from training.engine import train

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))  # 1 kB free, less than one checkpoint
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        train(quick_spec(**{"train.num_epochs": 3, "train.checkpoint_interval": 1}))
    warnings = [r.getMessage() for r in caplog.records if r.name == "training.checkpoint"]
    assert len(warnings) == 1 and warnings[0].startswith("the 2 checkpoint(s) still to come need about "), warnings
    assert "raise train.checkpoint_interval" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        train(quick_spec(**{"train.num_epochs": 2, "train.checkpoint_interval": 1, "results_dir": str(tmp_path / "roomy")}))
    assert not [r for r in caplog.records if r.name == "training.checkpoint"]
