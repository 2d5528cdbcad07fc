"""Which checkpoint a run wrote last."""
from training.checkpoint import latest_checkpoint


def test_the_last_checkpoint_is_the_highest_epoch_not_the_last_name(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ("model_epoch_010.pth", "model_epoch_999.pth", "model_epoch_1000.pth", "model_epoch_020.pth.tmp",
                 "model_epoch_best.pth"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "model_epoch_1000.pth"  # by name, 999 came last
