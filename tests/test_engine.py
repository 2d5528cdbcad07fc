"""The training loop end to end on synthetic data: checkpoints, resume, DDP on CPU, learning."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import Terminal, quick_overrides
from training.checkpoint import load_checkpoint
from training.config.load import build_spec
from training.data.market1501 import load_query, load_train
from training.data.synthetic import make_synthetic
from training.errors import ConfigError, DataError, ReidError, TrainingDiverged
from training.embed import embed_records, model_from_checkpoint
from training.data.transforms import check_images
from training.engine import Trainer, _train_loader, spawn_workers, train


def test_train_writes_checkpoints_and_metrics(quick_spec):
    spec = quick_spec(**{"train.validation_interval": 2})
    ckpt = train(spec)
    out = ckpt.parent
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_epoch_001.pth", "model_epoch_002.pth"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert "mAP" in lines[1] and "mAP" not in lines[0]
    assert all(np.isfinite(m["loss"]) and m["images_per_s"] > 0 for m in lines)
    payload = load_checkpoint(ckpt)
    assert payload["epoch"] == 2 and payload["spec"]["train"]["num_epochs"] == 2


def test_the_last_epoch_is_validated_too(quick_spec):
    """Every validation_interval epochs only: a run of 50 epochs validated every 20 said nothing of
    the model it ended with."""
    ckpt = train(quick_spec(**{"train.num_epochs": 3, "train.validation_interval": 2}))
    lines = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [("mAP" in m) for m in lines] == [False, True, True]


def test_validation_with_embeddings_that_are_not_finite_logs_an_error_and_training_goes_on(quick_spec, monkeypatch, caplog):
    """NaN embeddings used to give a validation mAP of 1.0; stopping instead would leave the other
    processes of a multi-GPU run waiting at the barrier."""
    import training.engine as engine

    real = engine.embed_records

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0] = np.nan
        return out

    monkeypatch.setattr(engine, "embed_records", broken)
    spec = quick_spec(**{"train.validation_interval": 1})
    ckpt = train(spec)
    lines = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and not any("mAP" in m for m in lines)
    assert "validation skipped: 2 of " in caplog.text and "embeddings are not finite" in caplog.text


def test_checkpoint_rebuilds_the_same_model(quick_spec, synthetic_root):
    spec = quick_spec(**{"train.num_epochs": 1})
    trainer = Trainer(spec, torch.device("cpu"))
    ckpt = trainer.fit()
    rebuilt, _ = model_from_checkpoint(str(ckpt))
    records = load_query(synthetic_root / "query")[:6]
    expected = embed_records(trainer.model, records, torch.device("cpu"))
    np.testing.assert_allclose(embed_records(rebuilt, records, torch.device("cpu")), expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_a_newer_version_is_refused_by_name(quick_spec, tmp_path):
    """The format number was written but never read: a newer layout would have been misread."""
    ckpt = load_checkpoint(Trainer(quick_spec(**{"train.num_epochs": 1}), torch.device("cpu")).fit())
    assert ckpt["format_version"] == 1
    newer = tmp_path / "newer.pth"
    torch.save({**ckpt, "format_version": 2}, newer)
    with pytest.raises(ReidError, match=r"newer.pth is a checkpoint of format 2, written by a newer version of reid; "
                                        r"this one reads format 1 and older"):
        load_checkpoint(newer)
    older = tmp_path / "older.pth"
    torch.save({k: v for k, v in ckpt.items() if k != "format_version"}, older)  # as before the number was kept
    assert load_checkpoint(older)["epoch"] == 1


def test_resume_equals_uninterrupted_run(synthetic_root, tmp_path):
    extra = {"model.metric_loss_type": "triplet_center", "model.with_center_loss": "True", "train.num_epochs": 3,
             "dataset.re_prob": 0.5, "train.optim.name": "SGD"}
    full = build_spec({}, quick_overrides(synthetic_root, tmp_path / "full", **extra))
    full_ckpt = load_checkpoint(train(full))
    first = build_spec({}, quick_overrides(synthetic_root, tmp_path / "part", **{**extra, "train.num_epochs": 1}))
    part_ckpt_path = train(first)
    resumed = build_spec({}, quick_overrides(
        synthetic_root, tmp_path / "part", **extra, **{"train.resume_training_checkpoint_path": str(part_ckpt_path)}))
    resumed_ckpt = load_checkpoint(train(resumed))
    assert resumed_ckpt["epoch"] == 3
    for key, value in full_ckpt["model_state"].items():
        torch.testing.assert_close(resumed_ckpt["model_state"][key], value, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(resumed_ckpt["loss_state"]["center.centers"], full_ckpt["loss_state"]["center.centers"])


@pytest.mark.parametrize("stop, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_stopped_run_names_the_checkpoint_to_resume_from(synthetic_root, tmp_path, stop, code, word):
    """SIGTERM (docker stop, a preempted machine) ended ``reid train`` at once, without a word;
    Ctrl-C said only "interrupted". Both now name the last checkpoint and the key that resumes it."""
    import signal
    import subprocess
    import sys
    import time

    results = tmp_path / "results"
    overrides = quick_overrides(synthetic_root, results, **{"train.num_epochs": 500})
    # as from a terminal: a job a shell starts in the background inherits SIGINT ignored (Python
    # then leaves it so), and in a suite run that way the child trained on through the signal
    child = subprocess.Popen([sys.executable, "-c", "from training.cli import main; raise SystemExit(main())",
                              "train", *overrides], cwd=Path(__file__).resolve().parents[1],
                             stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((results / "train").glob("model_epoch_*.pth")) and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(getattr(signal, stop))
    _, err = child.communicate(timeout=60)
    assert child.returncode == code, err
    last = err.strip().splitlines()[-1]
    latest = sorted((results / "train").glob("model_epoch_*.pth"))[-1]
    assert last == f"reid train: {word}; resume with train.resume_training_checkpoint_path={latest}"
    key = last.split("resume with ")[1]  # what the line says to do works
    epoch = int(latest.stem.split("_")[-1])
    resumed = train(build_spec({}, quick_overrides(synthetic_root, results, **{
        "train.num_epochs": epoch + 1, key.split("=")[0]: key.split("=", 1)[1]})))
    assert resumed.name == f"model_epoch_{epoch + 1:03d}.pth"


def test_a_second_run_on_a_results_dir_in_use_is_refused(synthetic_root, tmp_path, capsys):
    """A run refused a results_dir only once it held a checkpoint: a second run started before the
    first wrote one, or a resume started while the first still ran, overwrote its checkpoints epoch
    by epoch. The running one owns the folder now; the lock goes with its process."""
    import signal
    import subprocess
    import sys
    import time

    from training.cli import main

    results = tmp_path / "results"
    first = subprocess.Popen([sys.executable, "-c", "from training.cli import main; raise SystemExit(main())", "train",
                              *quick_overrides(synthetic_root, results, **{"train.num_epochs": 500})],
                             cwd=Path(__file__).resolve().parents[1], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((results / "train").glob("model_epoch_*.pth")) and time.monotonic() < deadline:
            time.sleep(0.1)
        latest = sorted((results / "train").glob("model_epoch_*.pth"))[-1]
        resume = {"train.resume_training_checkpoint_path": str(latest), "train.num_epochs": 600}
        capsys.readouterr()
        assert main(["train", *quick_overrides(synthetic_root, results, **resume)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(rf"reid train: error: results_dir={results} is in use by another training run \(pid "
                            rf"{first.pid} on \S+ since [^)]+\); let it finish or stop it first, or give this run "
                            "another results_dir", err), err
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    latest = sorted((results / "train").glob("model_epoch_*.pth"))[-1]
    epoch = int(latest.stem.split("_")[-1])
    resumed = train(build_spec({}, quick_overrides(synthetic_root, results, **{
        "train.resume_training_checkpoint_path": str(latest), "train.num_epochs": epoch + 1})))
    assert resumed.name == f"model_epoch_{epoch + 1:03d}.pth"  # the folder is free once its run has ended


def test_a_stop_whose_exception_was_lost_ends_training_at_the_next_batch(quick_spec, synthetic_root, tmp_path, capsys):
    """Under load, one SIGTERM in the full suite let training run on to its last epoch: the
    exception raised where the signal landed was lost. The request is noted too, and the loop
    raises it again at its next batch."""
    from training.cli import main
    from training.errors import STOP_REQUESTED, Terminated

    STOP_REQUESTED.set()  # as the handler leaves it, its exception gone
    try:
        with pytest.raises(Terminated):
            train(quick_spec(**{"train.num_epochs": 3}))
        assert not list((tmp_path / "results" / "train").glob("*.pth"))  # stopped in the first batch
        # a later command in the same process starts afresh
        assert main(["train", *quick_overrides(synthetic_root, tmp_path / "again", **{"train.num_epochs": 1})]) == 0
        assert not STOP_REQUESTED.is_set()
    finally:
        STOP_REQUESTED.clear()


def test_the_epoch_bar_is_drawn_at_most_once_a_second(quick_spec, monkeypatch):
    """Each step's loss went into the bar with a redraw, so its one-second interval never applied:
    every step drew the bar again."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(quick_spec(**{"train.num_epochs": 1}))  # 5 steps in well under a second
    assert 1 <= terminal.getvalue().count("epoch 1/1") <= 3  # first drawn, then closed (a slow second: once more)


def test_resume_rejects_a_different_model(quick_spec, synthetic_root, tmp_path):
    ckpt = train(quick_spec(**{"train.num_epochs": 1}))
    other = build_spec({}, quick_overrides(synthetic_root, tmp_path / "o", **{
        "model.feat_dim": 16, "dataset.pixel_std": [0.25, 0.25, 0.25],
        "train.resume_training_checkpoint_path": str(ckpt)}))
    with pytest.raises(ConfigError) as err:  # said "a different model spec", naming nothing
        train(other)
    feat_dim = quick_spec().model.feat_dim
    assert str(err.value) == (
        f"train.resume_training_checkpoint_path={ckpt} was trained with model.feat_dim={feat_dim} (now 16), "
        "dataset.pixel_std=[0.5, 0.5, 0.5] (now [0.25, 0.25, 0.25]); resume with the checkpoint's values")


def test_resume_refuses_other_optimizer_settings_in_one_line(quick_spec, monkeypatch):
    """Optimizer state of one kind does not load into another: torch failed with KeyError 'step'."""
    ckpt = str(train(quick_spec(**{"train.num_epochs": 1, "train.optim.name": "SGD"})))
    resume = {"train.num_epochs": 2, "train.resume_training_checkpoint_path": ckpt}
    with pytest.raises(ConfigError, match=r"was trained with train\.optim\.name=SGD; resume with the same value, not AdamW"):
        train(quick_spec(**resume, **{"train.optim.name": "AdamW"}))
    with pytest.raises(ConfigError, match=r"was trained with model\.with_center_loss=False"):
        train(quick_spec(**resume, **{"train.optim.name": "SGD", "model.metric_loss_type": "triplet_center",
                                      "model.with_center_loss": "True"}))
    # anything else that leaves the optimizer's state unfit is one line too
    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", lambda self, state: (_ for _ in ()).throw(
        ValueError("loaded state dict has a different number of parameter groups")))
    with pytest.raises(ConfigError, match="its optimizer state does not fit this spec's optimizer settings"):
        train(quick_spec(**resume, **{"train.optim.name": "SGD"}))


def test_distributed_training_on_cpu_with_two_gloo_processes(quick_spec):
    spec = quick_spec(**{"train.num_epochs": 1, "dataset.batch_size": 8})
    ckpt = spawn_workers(spec, world_size=2, backend="gloo")
    payload = load_checkpoint(ckpt)
    assert payload["epoch"] == 1
    metrics = payload["metrics"]
    assert np.isfinite(metrics["loss"]) and metrics["images"] > 0
    # the two ranks together saw as many images per epoch as a single process would
    single = Trainer(quick_spec(**{"train.num_epochs": 1}), torch.device("cpu"))
    assert metrics["images"] == len(single.sampler) * 8


def test_training_under_torchrun_uses_the_launchers_processes(synthetic_root, tmp_path):
    """docs/training.md gives `torchrun --nproc_per_node N -m training.cli train`: the launcher's
    ranks train together (gloo here), rank 0 alone writes checkpoints and the metrics log and
    prints the checkpoint line."""
    import subprocess
    import sys

    results = tmp_path / "results"
    overrides = quick_overrides(synthetic_root, results, **{"train.num_epochs": 1, "dataset.batch_size": 8})
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training.cli", "train", *overrides], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == [f"checkpoint: {results / 'train' / 'model_epoch_001.pth'}"]
    assert "2 process(es)" in run.stderr
    metrics = [json.loads(line) for line in (results / "train" / "metrics.jsonl").read_text().splitlines()]
    single = Trainer(build_spec({}, quick_overrides(synthetic_root, tmp_path / "single", **{"train.num_epochs": 1})),
                     torch.device("cpu"))
    assert [m["epoch"] for m in metrics] == [1] and metrics[0]["images"] == len(single.sampler) * 8


def test_a_torchrun_run_stopped_says_once_where_to_resume(synthetic_root, tmp_path):
    """torchrun passes a SIGTERM on to every rank: each printed the resume line."""
    import signal
    import subprocess
    import sys
    import time

    results = tmp_path / "results"
    overrides = quick_overrides(synthetic_root, results, **{"train.num_epochs": 500, "dataset.batch_size": 8})
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "training.cli", "train", *overrides], cwd=Path(__file__).resolve().parents[1],
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((results / "train").glob("model_epoch_*.pth")) and time.monotonic() < deadline:
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    lines = [line for line in err.splitlines() if line.startswith("reid train: terminated; resume with ")]
    latest = sorted((results / "train").glob("model_epoch_*.pth"))[-1]
    assert lines == [f"reid train: terminated; resume with train.resume_training_checkpoint_path={latest}"], err[-3000:]


def test_a_problem_one_process_finds_stops_every_process_with_its_one_line(synthetic_root, tmp_path):
    """A bad image in one rank's share, or a loss gone NaN, stopped that rank alone: the other
    failed in its next collective call, and spawn reported that one ("Connection closed by peer")
    with a child's traceback."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "bounding_box_train").glob("*.jpg"))[1]  # index 1: rank 1's share of 2
    victim.write_bytes(b"junk")
    spec = build_spec({}, quick_overrides(root, tmp_path / "a", **{"train.num_epochs": 1}))
    with pytest.raises(DataError, match=rf"^1 of 48 images cannot be read, (e.g. {victim}|found by another process)"):
        spawn_workers(spec, world_size=2, backend="gloo")
    spec = build_spec({}, quick_overrides(synthetic_root, tmp_path / "b", **{
        "train.num_epochs": 3, "train.optim.name": "SGD", "train.optim.base_lr": 1e8,
        "train.optim.warmup_epochs": 1, "train.optim.warmup_factor": 1e-10}))
    with pytest.raises(TrainingDiverged, match="training diverged"):
        spawn_workers(spec, world_size=2, backend="gloo")


@pytest.mark.slow
def test_tiny_swin_learns_far_above_chance(tmp_path):
    """About 30 s on 2 CPU cores: 40 training identities, 8 epochs, reduced Swin at 128x64."""
    root = tmp_path / "data"
    make_synthetic(root, identities=80, cameras=2, images_per_identity=12, seed=0)
    spec = build_spec({}, quick_overrides(root, tmp_path / "r", **{
        "dataset.num_classes": 40, "dataset.batch_size": 32, "dataset.num_instances": 4, "dataset.re_prob": 0.0,
        "model.input_height": 128, "model.input_width": 64, "model.feat_dim": 128,
        "model.backbone_overrides": "{embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 4, 8]}",
        "train.num_epochs": 8, "train.validation_interval": 8, "train.checkpoint_interval": 8,
        "train.optim.name": "AdamW", "train.optim.base_lr": 0.002, "train.optim.weight_decay": 0.01,
        "train.optim.warmup_epochs": 2, "train.optim.lr_steps": "[7]",
    }))
    metrics = load_checkpoint(train(spec))["metrics"]
    # Chance: each query has 6 true matches among 400 gallery images (mAP about 0.02, rank-1 about 0.015).
    assert metrics["mAP"] > 0.3, metrics
    assert metrics["rank1"] > 0.25, metrics


def test_tao_example_spec_trains_with_small_overrides(synthetic_root, tmp_path, capsys):
    """`reid train -e specs/tao_swin_tiny.yaml` with paths pointed at a synthetic set and sizes made small."""
    from training.cli import main

    spec = Path(__file__).resolve().parents[1] / "specs" / "tao_swin_tiny.yaml"
    overrides = quick_overrides(synthetic_root, tmp_path, **{"train.num_epochs": 1, "dataset.batch_size": 8})
    # keep the spec's own model keys (feat_dim 1024, soft margin, bnneck...) except the input size and depth
    overrides = [o for o in overrides if not o.startswith("model.feat_dim")]
    assert main(["train", "-e", str(spec), *overrides]) == 0
    out = capsys.readouterr().out
    ckpt = Path(out.strip().splitlines()[-1].removeprefix("checkpoint: "))
    payload = load_checkpoint(ckpt)
    assert payload["model_args"]["feat_dim"] == 1024 and payload["spec"]["model"]["no_margin"] is True


def test_a_fresh_run_refuses_a_results_dir_that_holds_a_run(quick_spec):
    first = train(quick_spec(**{"train.num_epochs": 1}))
    before = first.read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a training run .*model_epoch_001\.pth.*"
                                          r"train\.resume_training_checkpoint_path="):
        train(quick_spec(**{"train.num_epochs": 1}))
    assert first.read_bytes() == before


def test_metrics_log_holds_one_history_after_a_resume(quick_spec):
    """Resuming at epoch 1 of a 3-epoch run trains epochs 2-3 again: their old lines go."""
    run = train(quick_spec(**{"train.num_epochs": 3}))
    log_file = run.parent / "metrics.jsonl"
    with open(log_file, "a") as f:
        f.write('{"epoch": 4, "loss"')  # a line cut short by a crash
    train(quick_spec(**{"train.num_epochs": 3, "train.resume_training_checkpoint_path": str(run.parent / "model_epoch_001.pth")}))
    assert [json.loads(line)["epoch"] for line in log_file.read_text().splitlines()] == [1, 2, 3]


def test_batches_are_pinned_only_for_a_gpu(quick_spec):
    """Pinned (page-locked) batches let the training step's non_blocking copy overlap on a GPU; on a
    CPU they would only cost a copy."""
    spec = quick_spec()
    records = load_train(spec.dataset.train_dataset_dir, spec.dataset.num_classes)
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda", 0), True)):
        loader, _ = _train_loader(spec, records, 0, 1, device)  # built, not iterated: needs no GPU
        assert loader.pin_memory is pinned


def test_unreadable_images_stop_the_run_before_the_first_epoch(synthetic_root, tmp_path, caplog):
    """A corrupt image used to stop training when the sampler first drew it, epochs in; now every
    image the run reads is decoded first, and every bad one is named."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    truncated = sorted((root / "bounding_box_train").glob("*.jpg"))[5]
    truncated.write_bytes(truncated.read_bytes()[:300])  # a valid header: only decoding finds it
    junk = sorted((root / "query").glob("*.jpg"))[0]
    junk.write_bytes(b"not an image")
    results = tmp_path / "results"
    with pytest.raises(DataError, match=r"(?i)^2 of \d+ images cannot be read, e.g. .*truncated"):
        train(build_spec({}, quick_overrides(root, results, **{"train.validation_interval": 1})))
    logged = caplog.text
    assert str(truncated) in logged and str(junk) in logged
    assert not (results / "train" / "metrics.jsonl").exists()
    # without validation, the query split is not read, so only the training image counts
    with pytest.raises(DataError, match=r"^1 of \d+ images"):
        train(build_spec({}, quick_overrides(root, results, **{"train.validation_interval": 0})))


def test_each_process_checks_its_share_of_the_images(synthetic_root):
    paths = [str(p) for p in sorted((synthetic_root / "query").glob("*.jpg"))]
    paths[2] = str(synthetic_root / "missing.jpg")  # index 2: the share of rank 0 of 2
    check_images(paths, threads=2, rank=1, world_size=2)
    with pytest.raises(DataError, match="1 of 16 images cannot be read, e.g. .*missing.jpg"):
        check_images(paths, threads=2, rank=0, world_size=2)
    with pytest.raises(DataError, match="3 of 16 images cannot be read, found by another process"):  # summed
        check_images(paths, threads=2, rank=1, world_size=2, total=lambda mine: mine + 3)


def test_a_diverging_run_stops_before_a_checkpoint_holds_nan(quick_spec):
    """A learning rate far too high used to train on with a NaN loss and write NaN checkpoints."""
    # warm-up: epoch 1 at 1e8 x 1e-10 = 0.01 trains (and is checkpointed), the jump to 1e8 diverges
    spec = quick_spec(**{"train.num_epochs": 4, "train.optim.name": "SGD", "train.optim.base_lr": 1e8,
                         "train.optim.warmup_epochs": 1, "train.optim.warmup_factor": 1e-10})
    with pytest.raises(TrainingDiverged, match=r"the loss is nan in epoch [23] \(lr 1e\+08\): training diverged; "
                                               r"lower train.optim.base_lr .* then resume with "
                                               r"train.resume_training_checkpoint_path=.*model_epoch_00\d.pth"):
        train(spec)
    out = spec.results_dir + "/train"
    checkpoints = sorted(Path(out).glob("model_epoch_*.pth"))
    assert checkpoints and all(torch.isfinite(t).all() for c in checkpoints
                               for t in load_checkpoint(c)["model_state"].values() if t.is_floating_point())
    assert len(checkpoints) < 4


def test_mixed_precision_tolerates_a_few_overflowing_steps(quick_spec, monkeypatch):
    """With AMP the gradient scaler skips a step whose float16 forward overflowed; only a run of
    them is divergence. (AMP runs on CUDA only: the switch is flipped by hand here.)"""
    trainer = Trainer(quick_spec(**{"train.num_epochs": 1}), torch.device("cpu"))
    trainer.use_amp = True
    real_step, calls = trainer._step, []

    def step(images, pids):
        calls.append(1)
        total, parts = real_step(images, pids)
        return (float("inf"), parts) if len(calls) == 2 else (total, parts)  # one overflow

    monkeypatch.setattr(trainer, "_step", step)
    assert trainer.fit() is not None
    lines = [json.loads(line) for line in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(lines[-1]["loss"])  # the skipped step is left out of the mean
    monkeypatch.setattr(trainer, "_step", lambda images, pids: (float("nan"), {}))
    trainer.start_epoch, trainer.spec.train.num_epochs = 0, 2
    with pytest.raises(TrainingDiverged):  # 10 in a row: more than a 2-batch epoch holds, so it spans epochs
        trainer.fit()


def test_softmax_sampler_trains_the_id_loss_on_random_batches(quick_spec):
    """``dataset.sampler=softmax``: batches need not hold K images of a person, and only the ID loss is
    logged (a triplet term would find no positives in most of them)."""
    spec = quick_spec(**{"dataset.sampler": "softmax", "dataset.batch_size": 7, "train.num_epochs": 1})
    trainer = Trainer(spec, torch.device("cpu"))
    pids_per_batch = [len(set(pids.tolist())) for _, pids, _ in trainer.loader]
    assert max(pids_per_batch) > 7 // 2  # P x K batches of K = 2 would hold at most 3 people
    trainer.fit()
    (line,) = [json.loads(x) for x in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert "id" in line and "triplet" not in line and np.isfinite(line["loss"])


def test_clip_grad_norm_bounds_the_gradient_each_step_applies(quick_spec):
    """``train.clip_grad_norm``: what the optimizer sees has at most that norm (without it, the
    same batch's gradient is larger)."""
    seen = []

    def grad_norm_at_step(trainer):
        real = trainer.optimizer.step

        def step(*args, **kwargs):
            grads = [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))
            return real(*args, **kwargs)

        trainer.optimizer.step = step
        torch.manual_seed(0)
        images, pids, _ = next(iter(trainer.loader))
        trainer._step(images, pids)
        return seen[-1]

    free = grad_norm_at_step(Trainer(quick_spec(), torch.device("cpu")))
    clip = free / 10
    clipped = grad_norm_at_step(Trainer(quick_spec(**{"train.clip_grad_norm": clip}), torch.device("cpu")))
    assert clipped == pytest.approx(clip, rel=1e-3)


def test_a_batch_larger_than_the_training_set_is_a_one_line_config_error(quick_spec):
    n = len(load_train(Path(quick_spec().dataset.train_dataset_dir), 8))
    for sampler, why in (("softmax", f"larger than one epoch of the training set \\({n} images\\)"),
                         ("softmax_triplet", "identities per batch")):
        with pytest.raises(ConfigError, match=f"dataset.batch_size=1000.*{why}"):
            Trainer(quick_spec(**{"dataset.sampler": sampler, "dataset.batch_size": 1000}), torch.device("cpu"))


def test_each_epochs_log_line_says_how_long_the_run_has_left(quick_spec, caplog):
    import logging

    from training.engine import _time_left

    assert _time_left(600.0, 2, 5) == "; about 25 min left" and _time_left(10.0, 2, 3) == "; about 15 s left"
    assert _time_left(600.0, 2, 0) == ""
    with caplog.at_level(logging.INFO, logger="training.engine"):
        train(quick_spec(**{"train.num_epochs": 3}))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all(" s left" in line for line in lines[:2]) and "left" not in lines[2]


def test_resuming_a_finished_run_says_to_raise_num_epochs(quick_spec):
    """It trained no epoch, printed no checkpoint and exited 0."""
    ckpt = train(quick_spec(**{"train.num_epochs": 1}))
    with pytest.raises(ConfigError, match=r"checkpoint of epoch 1 and train.num_epochs=1: nothing is left to train; "
                                          r"raise train.num_epochs"):
        Trainer(quick_spec(**{"train.num_epochs": 1, "train.resume_training_checkpoint_path": str(ckpt)}),
                torch.device("cpu"))
    more = Trainer(quick_spec(**{"train.num_epochs": 2, "train.resume_training_checkpoint_path": str(ckpt)}),
                   torch.device("cpu")).fit()
    assert load_checkpoint(more)["epoch"] == 2


class _FullDisk:
    """A file on a disk that fills after ``room`` bytes: its writes then fail as a full disk's do."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(28, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_at_a_checkpoint_is_one_line_that_says_where_to_resume(synthetic_root, tmp_path, monkeypatch, capsys):
    """torch.save's zip writer turned the full disk into "RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos ...": a traceback that never said the disk was full."""
    import builtins

    import training.checkpoint
    from training.cli import main

    saves = []

    def open_(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        if not str(path).endswith(".pth.tmp"):
            return file
        saves.append(path)
        return _FullDisk(file, room=1 << 40 if len(saves) == 1 else 1 << 16)  # the second checkpoint fills it

    monkeypatch.setattr(training.checkpoint, "open", open_, raising=False)
    results = tmp_path / "results"
    code = main(["train", *quick_overrides(synthetic_root, results, **{"train.num_epochs": 3})])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    first, second = results / "train" / "model_epoch_001.pth", results / "train" / "model_epoch_002.pth"
    assert code == 2 and err == (f"reid train: error: {second}: No space left on device; once fixed, resume with "
                                 f"train.resume_training_checkpoint_path={first}"), err
    assert sorted(p.name for p in (results / "train").glob("model_epoch_*")) == [first.name]  # no partial file left
    assert load_checkpoint(first)["epoch"] == 1  # the last good one is whole


def test_out_of_gpu_memory_is_one_line_naming_the_settings_to_lower(synthetic_root, tmp_path, monkeypatch, capsys):
    """CUDA's out-of-memory error reached users as a traceback of allocator figures; it now names
    the batch sizes and input size in effect and what to lower (faked here: no GPU)."""
    from training.cli import main
    from training.engine import Trainer

    real_step, steps = Trainer._step, []

    def step(self, images, pids):
        steps.append(1)
        if len(steps) > 5:  # the second epoch's first batch: epoch 1 wrote a checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, images, pids)

    monkeypatch.setattr(Trainer, "_step", step)
    results = tmp_path / "results"
    overrides = quick_overrides(synthetic_root, results, **{"train.num_epochs": 3, "train.mixed_precision": False})
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("reid train: error: out of GPU memory with dataset.batch_size=8, dataset.val_batch_size=128, "
                   "model.input_height=64, model.input_width=32, train.mixed_precision=False: lower dataset.batch_size "
                   "or dataset.val_batch_size, or set train.mixed_precision=True (float16 activations); once fixed, "
                   f"resume with train.resume_training_checkpoint_path={results / 'train' / 'model_epoch_001.pth'}"), err

    from training.embedders import CheckpointEmbedder

    def embed(self, records, desc):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(CheckpointEmbedder, "embed", embed)
    for command in ("evaluate", "inference"):
        assert main([command, *overrides, f"{command}.checkpoint={results / 'train' / 'model_epoch_001.pth'}",
                     f"{command}.batch_size=64"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"reid {command}: error: out of GPU memory with {command}.batch_size=64, dataset.val_batch_size=128: "
            f"lower {command}.batch_size or dataset.val_batch_size")


def test_a_loader_out_of_shared_memory_is_warned_of_and_then_one_line(synthetic_root, tmp_path, monkeypatch, capsys, caplog):
    """Docker's 64 MiB of /dev/shm is less than two workers' batches of 256x128 crops; the failure
    came as a RuntimeError traceback from inside torch's collate (reproduced with a 4 MiB /dev/shm)."""
    from training.cli import main
    from training.data import shared_memory
    from training.engine import Trainer

    monkeypatch.setattr(shared_memory, "_free_bytes", lambda: 4 << 20)
    with caplog.at_level("WARNING"):
        shared_memory.check_shared_memory(32, 256, 128, 2)
    assert ("dataset.num_workers=2 workers keep about 48 MiB of batches in shared memory, and /dev/shm has 4 MiB free: "
            "give the container more (docker run --shm-size=2g") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        shared_memory.check_shared_memory(32, 256, 128, 0)  # no workers: nothing shared
        shared_memory.check_shared_memory(2, 64, 32, 2)  # fits
    assert caplog.text == ""
    assert shared_memory.shared_memory_error(RuntimeError("CUDA error: device-side assert")) is None
    killed = RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's "
                          "workers are out of shared memory. Please try to raise your shared memory limit.")
    assert "ran out of shared memory (/dev/shm: 4 MiB free now)" in str(shared_memory.shared_memory_error(killed))

    def step(self, images, pids):
        raise RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n...\nRuntimeError: unable to allocate shared memory(shm) for file </torch_1_2_0>: "
                           "No space left on device (28)")

    monkeypatch.setattr(Trainer, "_step", step)
    assert main(["train", *quick_overrides(synthetic_root, tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "reid train: error: the data loader's workers ran out of shared memory (/dev/shm: 4 MiB free now): give the "
        "container more (docker run --shm-size=2g, or --ipc=host; Kubernetes: an emptyDir with medium Memory at "
        "/dev/shm), or lower dataset.num_workers (0 loads in the main process, slower)")


def test_a_cuda_device_the_machine_lacks_is_refused_naming_the_key(synthetic_root, tmp_path, monkeypatch, capsys):
    """train.gpu_ids=[0,1] on a one-GPU machine started a process per id, and the second failed
    inside CUDA ("invalid device ordinal"); evaluate.gpu_id=1 the same at its first tensor. Faked
    here (no GPU): CUDA reports one device."""
    from training.cli import main
    from training.devices import cuda_or_cpu

    assert cuda_or_cpu(3, "evaluate.gpu_id") == torch.device("cpu")  # no CUDA: the CPU, whatever the index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert cuda_or_cpu(0, "evaluate.gpu_id") == torch.device("cuda", 0)
    spawned = []
    monkeypatch.setattr("training.engine.spawn_workers", lambda *args: spawned.append(args))
    results = tmp_path / "results"
    for command, key in [("train", "train.gpu_ids=[0,1]"), ("evaluate", "evaluate.gpu_id=1"),
                         ("inference", "inference.gpu_id=1")]:
        argv = [command, *quick_overrides(synthetic_root, results), key]
        if command != "train":
            argv.append(f"{command}.checkpoint={tmp_path / 'absent.onnx'}")
            (tmp_path / "absent.onnx").write_bytes(b"")  # exists: the device is checked before the model is read
        assert main(argv) == 2
        shown = key.split("=")[0] + ("=[0, 1]" if command == "train" else "")
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"reid {command}: error: {shown} names CUDA device 1, but this machine has 1 (0..0); "
            "CUDA_VISIBLE_DEVICES=3 numbers the visible ones from 0")
    assert spawned == []


def test_a_schedule_the_run_never_reaches_is_warned_about_when_training_starts(quick_spec, caplog):
    Trainer(quick_spec(**{"train.num_epochs": 2, "train.optim.lr_steps": "[1]"}), torch.device("cpu"))
    assert "never reached" not in caplog.text
    Trainer(quick_spec(**{"train.num_epochs": 2, "train.optim.lr_steps": "[1, 5]"}), torch.device("cpu"))
    assert "train.optim.lr_steps=[1, 5]: epoch 5 is never reached with train.num_epochs=2" in caplog.text


def test_validation_on_the_training_folder_is_warned_about(quick_spec, synthetic_root, caplog):
    train_dir = str(synthetic_root / "bounding_box_train")
    Trainer(quick_spec(**{"train.validation_interval": 1}), torch.device("cpu"))
    assert "are training images" not in caplog.text
    Trainer(quick_spec(**{"train.validation_interval": 1, "dataset.query_dataset_dir": train_dir,
                          "dataset.test_dataset_dir": train_dir}), torch.device("cpu"))
    assert "gallery images are training images" in caplog.text and "validation measures what the model memorized" in caplog.text
