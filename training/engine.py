"""The training loop: single process, multi-GPU (one process per GPU) or under ``torchrun``.

Every source of randomness (sampling, augmentation, dropout) is re-seeded from (seed, epoch) at
the start of each epoch, so resuming from an epoch checkpoint reproduces an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from retrieval.distance import cosine_distance
from retrieval.metrics import evaluate_rank
from retrieval.owner_lock import OwnerLock
from training.checkpoint import checkpoints_to_come, latest_checkpoint, load_checkpoint, save_checkpoint, warn_if_disk_runs_short
from training.config import ExperimentSpec, spec_to_dict
from training.data.market1501 import (ImageRecord, load_gallery, load_query, load_train, protocol_ids, require_folder,
                                      require_matches, warn_of_training_images)
from training.data.samplers import IdentityBatchSampler, RandomBatchSampler
from training.data.shared_memory import check_shared_memory
from training.data.transforms import ImageDataset, build_train_transform, check_images
from training.data.workers import loader_workers
from training.devices import cuda_or_cpu
from training.embed import embed_records, nonfinite_rows
from training.errors import STOP_REQUESTED, ConfigError, DataError, ReidError, Terminated, TrainingDiverged
from training.losses import ReIdLoss, loss_from_spec
from training.models import build_model, model_args_from_spec
from training.models.build import load_pretrained, model_args_differences
from training.optim import build_optimizer, lr_factor, set_epoch_lr, warn_of_unreached_schedule
from training.progress import progress, time_left

log = logging.getLogger(__name__)


# With mixed precision, an overflow in float16 gives a non-finite loss now and then: the gradient
# scaler skips that step and halves its scale. This many in a row is divergence, not overflow.
AMP_NONFINITE_STEPS = 10


def resume_hint(out_dir: Path) -> str:
    """Where a stopped run goes on from: the override that resumes its last checkpoint."""
    last = latest_checkpoint(out_dir)
    return (f"resume with train.resume_training_checkpoint_path={last}" if last
            else "start again (no checkpoint was written yet)")


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _time_left(elapsed: float, done: int, remaining: int) -> str:
    """"; about 25 min left" after an epoch of a long run: its epochs so far (with validation and
    checkpoints) at their mean pace; nothing after the last."""
    left = time_left(elapsed, done, remaining)
    return f"; {left}" if left else ""


def _is_main(rank: int) -> bool:
    return rank == 0


def validation_split(spec: ExperimentSpec) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The query and gallery records validation runs on, read when training starts so that a missing
    or misnamed folder stops the run then, not after the epochs before the first validation."""
    d, why = spec.dataset, f" (train.validation_interval={spec.train.validation_interval} evaluates on it)"
    query = load_query(require_folder(d.query_dataset_dir, "dataset.query_dataset_dir" + why))
    gallery = load_gallery(require_folder(d.test_dataset_dir, "dataset.test_dataset_dir" + why))
    require_matches(query, gallery, d.query_dataset_dir, d.test_dataset_dir, "validation",
                    "check the folders, or set train.validation_interval=0")
    return query, gallery


def validate(model, spec: ExperimentSpec, device: torch.device, query: list[ImageRecord],
             gallery: list[ImageRecord]) -> dict:
    """mAP and rank-1 of ``model`` on the validation query/gallery records (cosine distance).

    Nothing (and an error in the log) when some embeddings are not finite: no figure would mean
    anything, and stopping here would leave the other processes of a multi-GPU run waiting.
    """
    d, workers = spec.dataset, loader_workers(spec)
    qf = embed_records(model, query, device, d.val_batch_size, workers)
    gf = embed_records(model, gallery, device, d.val_batch_size, workers)
    bad = nonfinite_rows(qf) + nonfinite_rows(gf)
    if bad:
        log.error("validation skipped: %d of %d embeddings are not finite (NaN or inf)", bad, len(qf) + len(gf))
        return {}
    cmc, m_ap = evaluate_rank(cosine_distance(qf, gf), *protocol_ids(query, gallery))
    return {"mAP": m_ap, "rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)])}


def _train_loader(spec: ExperimentSpec, records, rank: int, world_size: int, device: torch.device):
    d, m = spec.dataset, spec.model
    transform = build_train_transform(m.input_height, m.input_width, d.prob, d.padding, d.re_prob, d.pixel_mean)
    try:
        if d.sampler == "softmax":
            sampler = RandomBatchSampler(len(records), d.batch_size, spec.train.seed, rank, world_size)
        else:
            sampler = IdentityBatchSampler(
                [r.pid for r in records], d.batch_size, d.num_instances, spec.train.seed, rank, world_size
            )
    except ValueError as exc:  # the samplers take plain numbers; name the spec keys behind them
        raise ConfigError(f"dataset.batch_size={d.batch_size}, dataset.num_instances={d.num_instances}, "
                          f"{world_size} process(es): {exc}") from None
    if len(sampler) == 0:
        share = f", {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"dataset.batch_size={d.batch_size} is larger than one epoch of the training set "
                          f"({len(records)} images{share}); lower it")
    # the whole batch: the processes on one machine (each with its share) fill one /dev/shm
    workers = loader_workers(spec, world_size)
    check_shared_memory(d.batch_size, m.input_height, m.input_width, workers)
    loader = torch.utils.data.DataLoader(
        ImageDataset(records, transform), batch_sampler=sampler, num_workers=workers,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",  # page-locked batches: the step's non_blocking copy then overlaps
    )
    return loader, sampler


class Trainer:
    """One process's share of a training run."""

    def __init__(self, spec: ExperimentSpec, device: torch.device, rank: int = 0, world_size: int = 1):
        self.spec, self.device, self.rank, self.world_size = spec, device, rank, world_size
        self.out_dir = Path(spec.results_dir) / "train"
        torch.manual_seed(spec.train.seed)
        self.records = load_train(require_folder(spec.dataset.train_dataset_dir, "dataset.train_dataset_dir"),
                                  spec.dataset.num_classes)
        self.val_split = validation_split(spec) if spec.train.validation_interval else None
        if _is_main(rank):
            if self.val_split:
                warn_of_training_images(spec.dataset.train_dataset_dir, *self.val_split, "validation")
            warn_of_unreached_schedule(spec.train.optim, spec.train.num_epochs)
        val_paths = [r.path for split in self.val_split for r in split] if self.val_split else []
        check_images([r.path for r in self.records] + val_paths, spec.dataset.num_workers, rank, world_size,
                     total=self._sum_over_processes)
        self.model_args = model_args_from_spec(spec)
        self.model = build_model(self.model_args).to(device)
        m = spec.model
        if m.pretrain_choice:
            load_pretrained(self.model, m.pretrained_model_path, m.pretrain_choice)
        self.loss_weights = loss_from_spec(spec)
        self.loss = ReIdLoss(self.loss_weights, self.model_args.num_classes, self.model_args.feat_dim).to(device)
        optim = spec.train.optim
        self.optimizer = build_optimizer(self.model, optim)
        self.center_optimizer = (
            torch.optim.SGD(self.loss.center.parameters(), lr=optim.center_lr) if self.loss.center is not None else None
        )
        self.use_amp = device.type == "cuda" and spec.train.mixed_precision
        if device.type == "cuda":  # every training batch has one shape (P x K at the input size): cuDNN times
            torch.backends.cudnn.benchmark = True  # its convolution algorithms once and keeps the fastest
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch = 0
        if spec.train.resume_training_checkpoint_path:
            self._resume(spec.train.resume_training_checkpoint_path)
        self.net = self.model
        if world_size > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.loader, self.sampler = _train_loader(spec, self.records, rank, world_size, device)

    def _sum_over_processes(self, value: int) -> int:
        """``value`` summed over the run's processes: a condition one process finds (a bad image, a
        non-finite loss) must stop all of them at the same point, or the others wait forever in
        their next collective call."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def _resume(self, path: str) -> None:
        key = f"train.resume_training_checkpoint_path={path}"
        ckpt = load_checkpoint(path)
        differences = model_args_differences(ckpt["model_args"], self.model_args)
        if differences:  # its weights would not fit this model, or would mean something else
            raise ConfigError(f"{key} was trained with {', '.join(differences)}; resume with the checkpoint's values")
        saved = ckpt.get("spec", {})
        for name, before, now in (
            ("train.optim.name", saved.get("train", {}).get("optim", {}).get("name"), self.spec.train.optim.name),
            ("model.with_center_loss", saved.get("model", {}).get("with_center_loss"), self.spec.model.with_center_loss),
        ):
            if before is not None and before != now:
                # optimizer state of one kind does not load into another (torch fails with KeyError 'step')
                raise ConfigError(f"{key} was trained with {name}={before}; resume with the same value, not {now}")
        self.model.load_state_dict(ckpt["model_state"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
            if self.center_optimizer is not None:
                self.loss.load_state_dict(ckpt["loss_state"])
                self.center_optimizer.load_state_dict(ckpt["center_optimizer_state"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{key}: its optimizer state does not fit this spec's optimizer settings ({exc}); "
                              "resume with the settings it was trained with") from None
        if ckpt.get("scaler_state"):
            self.scaler.load_state_dict(ckpt["scaler_state"])
        self.start_epoch = int(ckpt["epoch"])
        if self.start_epoch >= self.spec.train.num_epochs:  # the loop would run no epoch and say nothing
            raise ConfigError(f"{key} is the checkpoint of epoch {self.start_epoch} and train.num_epochs="
                              f"{self.spec.train.num_epochs}: nothing is left to train; raise train.num_epochs "
                              "to train further")
        if _is_main(self.rank):
            log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _step(self, images: torch.Tensor, pids: torch.Tensor) -> tuple[float, dict]:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            logits, feats = self.net(images)
        total, parts = self.loss(logits, feats, pids)
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        clip = self.spec.train.clip_grad_norm
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        if self.center_optimizer is not None:
            self.scaler.unscale_(self.center_optimizer)
            for p in self.loss.center.parameters():
                if self.world_size > 1:  # the loss sits outside DDP: average center gradients by hand
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size
                p.grad *= 1.0 / self.loss_weights.center_weight
            self.scaler.step(self.center_optimizer)
        self.scaler.update()
        return float(total.detach()), parts

    def _save(self, epoch: int, metrics: dict) -> Path:
        return save_checkpoint(
            self.out_dir / f"model_epoch_{epoch:03d}.pth",
            {
                "epoch": epoch,
                "model_args": self.model_args.to_dict(),
                "model_state": self.model.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "loss_state": self.loss.state_dict(),
                "center_optimizer_state": self.center_optimizer.state_dict() if self.center_optimizer else {},
                "scaler_state": self.scaler.state_dict() if self.use_amp else {},
                "spec": spec_to_dict(self.spec),
                "metrics": metrics,
            },
        )

    def _restart_metrics_log(self) -> None:
        """metrics.jsonl tells one run's history: a resumed run keeps the epochs up to its checkpoint
        and drops those it will train again; a fresh run starts the file anew."""
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if self.start_epoch and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("epoch", 0) <= self.start_epoch:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short when the earlier run stopped
                    continue
        path.write_text("".join(line + "\n" for line in kept))

    def _diverged(self, loss: float, epoch: int, lr: float) -> None:
        """Stop before a checkpoint holds the lost weights (without mixed precision, the step that
        gave a NaN loss already wrote NaN into them), and say where to go on from."""
        what = f"the loss is {loss}" if not math.isfinite(loss) else "another process's loss is not finite"
        raise TrainingDiverged(f"{what} in epoch {epoch + 1} (lr {lr:.3g}): training diverged; lower "
                               f"train.optim.base_lr or set train.clip_grad_norm, then {resume_hint(self.out_dir)}")

    def fit(self) -> Path | None:
        spec, t = self.spec, self.spec.train
        main = _is_main(self.rank)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log.info(
                "training %s on %d images of %d identities, %s, loss = %s, %d process(es)",
                spec.model.backbone, len(self.records), self.model_args.num_classes, self.device,
                self.loss_weights.describe(), self.world_size,
            )
            self._restart_metrics_log()
        last_ckpt = None
        nonfinite = 0  # losses in a row that were not finite numbers
        run_start = time.perf_counter()
        for epoch in range(self.start_epoch, t.num_epochs):
            seed = _epoch_seed(t.seed, epoch)
            torch.manual_seed(seed)
            self.loader.generator.manual_seed(seed)
            self.sampler.set_epoch(epoch)
            o = t.optim
            factor = lr_factor(epoch, o.lr_steps, o.gamma, o.warmup_epochs, o.warmup_factor, o.warmup_method)
            set_epoch_lr(self.optimizer, factor)
            self.net.train()
            sums: dict[str, float] = {}
            n_images, n_steps, start = 0, 0, time.perf_counter()
            # ``with``: the bar is closed however the loop ends, so that a stop's line starts a line of its own;
            # a SIGTERM between the bar's first display and its first step once left it open ("epoch 2/500:
            # 0%| ... reid train: terminated; ...", one line)
            with progress(self.loader, desc=f"epoch {epoch + 1}/{t.num_epochs}", disable=not main, unit="batch", mininterval=1.0) as bar:
                for images, pids, _ in bar:
                    if STOP_REQUESTED.is_set():  # a SIGTERM whose exception was lost where it landed
                        raise Terminated()
                    total, parts = self._step(images.to(self.device, non_blocking=True), pids.to(self.device))
                    n_images += images.shape[0] * self.world_size
                    if self._sum_over_processes(int(not math.isfinite(total))):
                        nonfinite += 1
                        if not self.use_amp or nonfinite >= AMP_NONFINITE_STEPS:
                            self._diverged(total, epoch, o.base_lr * factor)
                        continue  # a step the gradient scaler skipped: not part of the epoch's mean
                    nonfinite = 0
                    for k, v in {"loss": total, **parts}.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_steps += 1
                    bar.set_postfix(loss=f"{total:.3f}", lr=f"{o.base_lr * factor:.2e}", img_s=f"{n_images / (time.perf_counter() - start):.1f}",
                                    refresh=False)  # drawn with the next update, at most once a second (mininterval)
            metrics = {k: v / max(n_steps, 1) for k, v in sums.items()}
            metrics.update(epoch=epoch + 1, lr=o.base_lr * factor, images=n_images,
                           images_per_s=n_images / (time.perf_counter() - start), seconds=time.perf_counter() - start)
            # and after the last epoch, as for checkpoints: a run of 50 epochs validated every 20 said
            # nothing of the model it ended with
            if t.validation_interval and ((epoch + 1) % t.validation_interval == 0 or epoch + 1 == t.num_epochs):
                if main:
                    metrics.update(validate(self.model, spec, self.device, *self.val_split))
                if self.world_size > 1:
                    dist.barrier()
            if main:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                log.info("epoch %d: %s%s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"),
                         _time_left(time.perf_counter() - run_start, epoch + 1 - self.start_epoch, t.num_epochs - epoch - 1))
                if (epoch + 1) % t.checkpoint_interval == 0 or epoch + 1 == t.num_epochs:
                    first = last_ckpt is None
                    last_ckpt = self._save(epoch + 1, metrics)
                    log.info("wrote %s", last_ckpt)
                    if first:
                        warn_if_disk_runs_short(last_ckpt, checkpoints_to_come(epoch + 1, t.num_epochs, t.checkpoint_interval))
        return last_ckpt


def _device_for(spec: ExperimentSpec, local_rank: int) -> torch.device:
    ids = spec.train.gpu_ids
    return cuda_or_cpu(ids[local_rank] if local_rank < len(ids) else local_rank, f"train.gpu_ids={ids}")


def _worker(rank: int, spec: ExperimentSpec, world_size: int, backend: str, port: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = _device_for(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        ckpt = Trainer(spec, device, rank, world_size).fit()
        if rank == 0:
            Path(result_file).write_text(str(ckpt or ""))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(spec: ExperimentSpec, world_size: int, backend: str) -> Path | None:
    """Run ``world_size`` training processes on this machine (one per GPU, or gloo on CPU)."""
    result = Path(spec.results_dir) / "train" / ".last_checkpoint"
    result.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.multiprocessing.spawn(_worker, args=(spec, world_size, backend, _free_port(), str(result)), nprocs=world_size)
    except torch.multiprocessing.ProcessRaisedException as exc:
        # The child's traceback comes as text; a user-facing error keeps its one line, anything else its traceback.
        last = str(exc).strip().splitlines()[-1]
        for kind in (DataError, ConfigError, TrainingDiverged, ReidError):
            prefix = f"{kind.__module__}.{kind.__name__}: "
            if last.startswith(prefix):
                raise kind(last[len(prefix):]) from None
        raise
    text = result.read_text().strip()
    return Path(text) if text else None


def check_results_dir(spec: ExperimentSpec) -> None:
    """A fresh run must not overwrite another run's checkpoints: they would be replaced epoch by
    epoch, and its metrics log mixed with the new run's."""
    if spec.train.resume_training_checkpoint_path:
        return
    existing = latest_checkpoint(Path(spec.results_dir) / "train")
    if existing:
        raise ConfigError(f"results_dir={spec.results_dir} already holds a training run ({existing}); continue it with "
                          f"train.resume_training_checkpoint_path={existing}, or give another results_dir")


def launcher_rank() -> int:
    """This process's rank in a run torchrun launched (its RANK variable); 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def own_results_dir(spec: ExperimentSpec) -> OwnerLock | None:
    """Keep other training runs off ``results_dir/train`` while this one runs (``retrieval.owner_lock``):
    two runs there, or a resume started while the run still goes, would overwrite each other's
    checkpoints epoch by epoch; a fresh run is refused by ``check_results_dir`` only once a
    checkpoint exists. Under torchrun, rank 0 holds it for all."""
    if launcher_rank() != 0:
        return None
    folder = Path(spec.results_dir) / "train"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # said only "PATH: No such file or directory", for a folder it could not create
        raise ConfigError(f"results_dir={spec.results_dir}: cannot create {folder}: {exc.strerror or exc}") from None

    def in_use(holder: str) -> ConfigError:
        return ConfigError(f"results_dir={spec.results_dir} is in use by another training run ({holder}); let it "
                           "finish or stop it first, or give this run another results_dir")

    return OwnerLock(folder, "other training runs off this results_dir", in_use, ConfigError)


def train(spec: ExperimentSpec) -> Path | None:
    """Train per the spec; returns the last checkpoint written (rank 0)."""
    owner = own_results_dir(spec)
    try:
        return _train(spec)
    finally:
        if owner is not None:
            owner.release()


def _train(spec: ExperimentSpec) -> Path | None:
    check_results_dir(spec)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # launched by torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = _device_for(spec, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            return Trainer(spec, device, dist.get_rank(), dist.get_world_size()).fit()
        finally:
            dist.destroy_process_group()
    gpus = spec.train.gpu_ids
    if len(gpus) > 1:
        if torch.cuda.is_available():
            for rank in range(len(gpus)):  # before any process starts, not as one worker's CUDA error
                _device_for(spec, rank)
            return spawn_workers(spec, len(gpus), "nccl")
        log.warning("train.gpu_ids=%s but no CUDA device is available; training on the CPU in one process", gpus)
    elif not torch.cuda.is_available():
        log.info("no CUDA device available; training on the CPU")
    return Trainer(spec, _device_for(spec, 0)).fit()
