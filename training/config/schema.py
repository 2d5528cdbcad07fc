"""The experiment spec as typed dataclasses, mirroring TAO's ReIdentificationNet Transformer spec.

Each field's ``metadata`` holds its constraint (``choices`` or a numeric range), so one validator
checks every key and names it in the error. Defaults are TAO's documented defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

BACKBONES = (
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "resnet_50",
)


def choice(default, *options, doc: str = ""):
    return field(default=default, metadata={"choices": options, "doc": doc})


def ranged(default, lo=None, hi=None, lo_open=False, doc: str = ""):
    return field(default=default, metadata={"range": (lo, hi, lo_open), "doc": doc})


def listed(default, length=None, lo=None, lo_open=False, doc: str = ""):
    return field(
        default_factory=lambda: list(default),
        metadata={"length": length, "item_range": (lo, None, lo_open), "doc": doc},
    )


@dataclass
class ModelConfig:
    backbone: str = choice("swin_tiny_patch4_window7_224", *BACKBONES)
    last_stride: int = choice(1, 1, 2, doc="stride of ResNet-50's last stage (1 doubles the feature map)")
    pretrain_choice: str = choice("", "imagenet", "self", "", doc="default \"\" (TAO: imagenet): nothing is downloaded, so a pretrained start needs a local file")
    pretrained_model_path: str = ""
    input_channels: int = choice(3, 3)
    input_width: int = ranged(128, 16, 2048)
    input_height: int = ranged(384, 16, 2048)
    neck: str = choice("bnneck", "bnneck", "")
    stride_size: List[int] = listed([16, 16], length=2, lo=1)
    feat_dim: int = ranged(1024, 1)
    no_margin: bool = False
    neck_feat: str = choice("after", "before", "after")
    metric_loss_type: str = choice("triplet", "triplet", "center", "triplet_center")
    with_center_loss: bool = False
    with_flip_feature: bool = False
    label_smooth: bool = False
    pretrain_hw_ratio: float = ranged(2.0, 0.0, lo_open=True)
    backbone_overrides: dict = field(
        default_factory=dict,
        metadata={"doc": "extra constructor arguments for the backbone (e.g. a smaller Swin for quick runs)"},
    )


@dataclass
class DatasetConfig:
    train_dataset_dir: str = ""
    test_dataset_dir: str = ""
    query_dataset_dir: str = ""
    num_classes: int = ranged(751, 1)
    batch_size: int = ranged(64, 1)
    val_batch_size: int = ranged(128, 1)
    num_workers: int = ranged(8, 0)
    pixel_mean: List[float] = listed([0.5, 0.5, 0.5], length=3)
    pixel_std: List[float] = listed([0.5, 0.5, 0.5], length=3, lo=0.0, lo_open=True)
    padding: int = ranged(10, 0)
    prob: float = ranged(0.5, 0.0, 1.0)
    re_prob: float = ranged(0.5, 0.0, 1.0)
    sampler: str = choice("softmax_triplet", "softmax", "triplet", "softmax_triplet")
    num_instances: int = ranged(4, 0, lo_open=True)


@dataclass
class ReRankingConfig:
    re_ranking: bool = False
    k1: int = ranged(20, 1)
    k2: int = ranged(6, 1)
    lambda_value: float = ranged(0.3, 0.0, 1.0)


@dataclass
class OptimConfig:
    name: str = choice("SGD", "SGD", "Adam", "AdamW")
    lr_steps: List[int] = listed([40, 70], lo=0)
    gamma: float = ranged(0.1, 0.0, lo_open=True)
    bias_lr_factor: float = ranged(1.0, 0.0)
    weight_decay: float = ranged(0.0005, 0.0)
    weight_decay_bias: float = ranged(0.0005, 0.0)
    warmup_factor: float = ranged(0.01, 0.0, 1.0)
    warmup_epochs: int = ranged(10, 0)
    warmup_method: str = choice("linear", "cosine", "linear")
    base_lr: float = ranged(0.00035, 0.0, lo_open=True)
    momentum: float = ranged(0.9, 0.0, 1.0)
    center_loss_weight: float = ranged(0.0005, 0.0)
    center_lr: float = ranged(0.5, 0.0, lo_open=True)
    triplet_loss_margin: float = ranged(0.3, 0.0)
    large_fc_lr: bool = False


@dataclass
class TrainConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    num_epochs: int = ranged(120, 1)
    checkpoint_interval: int = ranged(10, 1)
    validation_interval: int = ranged(0, 0, doc="evaluate on query/test every N epochs and after the last; 0 = never")
    gpu_ids: List[int] = listed([0], lo=0)
    clip_grad_norm: float = ranged(0.0, 0.0)
    resume_training_checkpoint_path: str = ""
    mixed_precision: bool = field(default=True, metadata={"doc": "fp16 autocast on CUDA; no effect on CPU"})
    seed: int = ranged(1234, 0)


@dataclass
class EvaluateConfig:
    checkpoint: str = ""
    query_dataset: str = ""
    test_dataset: str = ""
    output_cmc_curve_plot: str = ""
    output_sampled_matches_plot: str = ""
    gpu_id: int = ranged(0, 0)
    batch_size: int = ranged(0, 0, doc="0 = dataset.val_batch_size")
    server: str = field(default="", metadata={"doc": "host:port of a reid-serve server: evaluate through its gallery"})


@dataclass
class InferenceConfig:
    checkpoint: str = ""
    output_file: str = ""
    query_dataset: str = ""
    test_dataset: str = ""
    gpu_id: int = ranged(0, 0)
    batch_size: int = ranged(0, 0, doc="0 = dataset.val_batch_size")


@dataclass
class ExportConfig:
    checkpoint: str = ""
    onnx_file: str = ""
    gpu_id: int = ranged(0, 0)


@dataclass
class ExperimentSpec:
    results_dir: str = "results"
    encryption_key: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    re_ranking: ReRankingConfig = field(default_factory=ReRankingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # The keys the spec file or the overrides set, as "section.key" (``build_spec`` fills it): a
    # default and a value given equal to it are not the same answer to "how was this model
    # trained?" (see training.embedders.EngineEmbedder). Not a field: never saved or compared.
    given_keys: ClassVar[frozenset[str]] = frozenset()
