"""Spec loading: the TAO example verbatim, overrides, and every error path."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from training.config import load_spec
from training.config.load import build_spec, parse_override
from training.errors import ConfigError

SPECS = Path(__file__).resolve().parents[1] / "specs"
TAO_SPEC = SPECS / "tao_swin_tiny.yaml"


def test_tao_example_spec_loads_verbatim(caplog):
    with caplog.at_level(logging.WARNING):
        spec = load_spec(TAO_SPEC)
    assert spec.model.backbone == "swin_tiny_patch4_window7_224"
    assert spec.model.input_height == 384 and spec.model.feat_dim == 1024 and spec.model.no_margin is True
    assert spec.dataset.sampler == "softmax_triplet" and spec.dataset.num_instances == 4
    assert spec.train.optim.lr_steps == [40, 70] and spec.train.optim.warmup_method == "cosine"
    assert spec.re_ranking.k1 == 20 and spec.re_ranking.lambda_value == 0.3
    text = caplog.text
    assert "encryption_key is ignored" in text
    assert "model.stride_size=[16, 16] has no effect" in text and "model.pretrain_hw_ratio=" in text


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_loads(path):
    """A spec in specs/ that no longer validates (a renamed key, a value out of range) fails here, not in a user's run."""
    spec = load_spec(path, ["results_dir=/tmp/x"])
    assert spec.model.backbone and spec.dataset.num_classes > 0 and spec.train.num_epochs > 0


def test_overrides_parse_types_and_lists():
    spec = load_spec(TAO_SPEC, ["train.gpu_ids=[0,1]", "train.optim.base_lr=1e-3", "model.with_flip_feature=True",
                                "results_dir=/tmp/x", "train.num_epochs=3"])
    assert spec.train.gpu_ids == [0, 1]
    assert spec.train.optim.base_lr == pytest.approx(1e-3)
    assert spec.model.with_flip_feature is True
    assert spec.results_dir == "/tmp/x" and spec.train.num_epochs == 3


def test_parse_override_rejects_missing_equals():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.num_epochs")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.bacbone=resnet_50", "unknown key model.bacbone"),
        ("train.optim.lr=0.1", "unknown key train.optim.lr"),
        ("dataset.num_instances=0", "dataset.num_instances=0 is out of range"),
        ("dataset.sampler=random", "dataset.sampler='random' is not allowed"),
        ("train.optim.warmup_method=step", "train.optim.warmup_method='step' is not allowed"),
        ("model.backbone=vit_base", "model.backbone='vit_base' is not allowed"),
        ("train.num_epochs=ten", "train.num_epochs must be an integer"),
        ("train.num_epochs=2.5", "train.num_epochs must be an integer"),
        ("model.no_margin=yes please", "model.no_margin must be true or false"),
        ("dataset.pixel_mean=[0.5,0.5]", "dataset.pixel_mean must have 3 items"),
        ("dataset.pixel_std=[0.5,0,0.5]", r"dataset.pixel_std\[1\]=0.0 is out of range"),
        ("dataset.prob=1.5", "dataset.prob=1.5 is out of range"),
        ("train.gpu_ids=0", "train.gpu_ids must be a list"),
        ("model=3", "model must be a mapping"),
        ("model.backbone.depth=2", "override model.backbone.depth: model.backbone is not a section"),
        ("model.input_height=", "model.input_height must be an integer"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(TAO_SPEC, [override])


def test_non_applicable_keys_rejected_when_changed():
    with pytest.raises(ConfigError, match=r"model.stride_size=\[12, 12\] cannot apply with backbone swin_tiny"):
        load_spec(TAO_SPEC, ["model.stride_size=[12,12]"])
    with pytest.raises(ConfigError, match="model.last_stride=2 cannot apply"):
        load_spec(TAO_SPEC, ["model.last_stride=2"])
    spec = load_spec(TAO_SPEC, ["model.backbone=resnet_50", "model.last_stride=2"])
    assert spec.model.last_stride == 2


@pytest.mark.parametrize("overrides, message", [
    # tuning a margin the soft-margin loss does not have, a momentum AdamW does not take: no effect, silently
    (["train.optim.triplet_loss_margin=0.5"], "train.optim.triplet_loss_margin=0.5 has no effect with model.no_margin=True: "
                                              "the soft-margin triplet loss has no margin; ignored"),
    (["dataset.sampler=softmax", "model.no_margin=False", "train.optim.triplet_loss_margin=0.5"],
     "with dataset.sampler=softmax and model.metric_loss_type=triplet: no triplet loss is trained"),
    (["train.optim.name=AdamW", "train.optim.momentum=0.95"], "train.optim.momentum=0.95 has no effect with "
                                                               "train.optim.name=AdamW: it is SGD's momentum; ignored"),
    (["train.optim.center_lr=0.1"], "train.optim.center_lr=0.1 has no effect with model.with_center_loss=False"),
])
def test_optimizer_and_loss_keys_changed_where_they_do_nothing_are_warned_of(overrides, message, caplog):
    """Toggled settings (model.no_margin, the optimizer, center loss) leave such keys behind: a
    warning, not a refusal, so that a spec can keep tuned values while a toggle is tried."""
    with caplog.at_level(logging.WARNING):
        load_spec(TAO_SPEC, overrides)
    assert message in caplog.text


def test_pixel_statistics_on_the_0_to_255_scale_are_refused():
    """An OpenMMLab-style mean/std (123.675, ...) normalized 0..1 images into a few hundredths
    around -2: a model trained on that learns from garbage, silently."""
    with pytest.raises(ConfigError, match=r"dataset.pixel_mean=\[123.675, 116.28, 103.53\] / dataset.pixel_std=\[58.395, "
                                          r"57.12, 57.375\] look like 0..255 values.*divide them by 255"):
        load_spec(TAO_SPEC, ["dataset.pixel_mean=[123.675,116.28,103.53]", "dataset.pixel_std=[58.395,57.12,57.375]"])
    assert load_spec(TAO_SPEC, ["dataset.pixel_mean=[1.0,1.0,1.0]", "dataset.pixel_std=[1.0,1.0,1.0]"])


def test_optimizer_and_loss_keys_apply_where_their_setting_is_on(caplog):
    with caplog.at_level(logging.WARNING):
        spec = load_spec(TAO_SPEC, ["model.no_margin=False", "train.optim.triplet_loss_margin=0.5",
                                    "train.optim.momentum=0.95", "model.with_center_loss=True",
                                    "model.metric_loss_type=triplet_center", "train.optim.center_lr=0.1"])
        assert (spec.train.optim.triplet_loss_margin, spec.train.optim.momentum, spec.train.optim.center_lr) == (0.5, 0.95, 0.1)
        load_spec(TAO_SPEC)  # the TAO example sets them at their defaults where they do nothing: not worth a word
    assert "train.optim" not in caplog.text


def test_center_loss_keys_must_agree():
    with pytest.raises(ConfigError, match="with_center_loss=True contradicts"):
        load_spec(TAO_SPEC, ["model.with_center_loss=True"])
    spec = load_spec(TAO_SPEC, ["model.with_center_loss=True", "model.metric_loss_type=triplet_center"])
    assert spec.model.with_center_loss


def test_batch_must_hold_whole_identities():
    with pytest.raises(ConfigError, match="multiple of dataset.num_instances"):
        load_spec(TAO_SPEC, ["dataset.batch_size=30"])
    assert load_spec(TAO_SPEC, ["dataset.batch_size=30", "dataset.sampler=softmax"]).dataset.batch_size == 30


def test_backbone_overrides_must_be_swin_arguments():
    """timm drops constructor arguments it does not know without a word: a misspelt key trained
    the default architecture."""
    with pytest.raises(ConfigError, match=r"model.backbone_overrides: depth is not a Swin Transformer argument; "
                                          r"choose from .*depths.*embed_dim"):
        load_spec(TAO_SPEC, ["model.backbone_overrides={depth: [1, 1, 1, 1], embed_dim: 32}"])
    with pytest.raises(ConfigError, match="img_size is not a Swin Transformer argument"):  # set from model.input_*
        load_spec(TAO_SPEC, ["model.backbone_overrides={img_size: 64}"])
    spec = load_spec(TAO_SPEC, ["model.backbone_overrides={depths: [1, 1, 1, 1], embed_dim: 32}"])
    assert spec.model.backbone_overrides == {"depths": [1, 1, 1, 1], "embed_dim": 32}
    with pytest.raises(ConfigError, match="model.backbone_overrides applies to Swin backbones only"):
        load_spec(TAO_SPEC, ["model.backbone=resnet_50", "model.backbone_overrides={depths: [1, 1, 1, 1]}"])


def test_pretrained_choice_needs_a_path():
    with pytest.raises(ConfigError, match="needs model.pretrained_model_path"):
        build_spec({"model": {"pretrain_choice": "imagenet"}})


def test_lr_steps_must_increase():
    with pytest.raises(ConfigError, match="must be increasing"):
        load_spec(TAO_SPEC, ["train.optim.lr_steps=[70,40]"])


def test_missing_and_invalid_spec_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_spec(bad)
    # PyYAML's own message spans four lines (context, snippet, caret); the CLI prints one
    assert str(err.value) == f"spec file {bad} is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"
    twice = tmp_path / "twice.yaml"  # a second section at the end of a copied spec: its first one was dropped
    twice.write_text("train:\n  num_epochs: 5\ntrain:\n  optim:\n    base_lr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_spec(twice)
    assert str(err.value) == (f"spec file {twice} is not valid YAML: line 3, column 1: key 'train' appears twice in one "
                              "mapping (first on line 1); YAML would keep only the later value: merge the two")
    with pytest.raises(ConfigError, match="is a folder; give the YAML file"):  # said "does not exist"
        load_spec(tmp_path)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- dataset\n")
    with pytest.raises(ConfigError, match="holds a list; a spec is a mapping of sections"):  # was a ValueError traceback
        load_spec(listing)
    with pytest.raises(ConfigError) as err:
        load_spec(None, ["train.gpu_ids=[0,"])
    assert str(err.value) == ("override train.gpu_ids: cannot parse value '[0,': line 1, column 4: "
                              "expected the node content, but found '<stream end>'")


def test_an_input_size_wider_than_high_is_warned_about(caplog):
    """Height and width swapped trained on squashed people without a word."""
    build_spec({}, ["model.input_height=128", "model.input_width=256"])
    assert caplog.messages == ["model.input_height=128, model.input_width=256: wider than high, but person crops are "
                               "taller than wide (height first: 256x128 is usual); were the two swapped?"]
    caplog.clear()
    build_spec({}, ["model.input_height=256", "model.input_width=128"])
    build_spec({"model": {"input_height": 64, "input_width": 64}}, [])
    assert caplog.messages == []


def test_a_spec_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Under LC_ALL=POSIX (cron, minimal containers) Python reads files as ASCII: a spec with a
    non-ASCII path or comment ended in a UnicodeDecodeError traceback; one saved in Latin-1 too."""
    import os
    import subprocess
    import sys

    spec = tmp_path / "spec.yaml"
    spec.write_text("# Zoë's run\nresults_dir: runs/Zoë\n", encoding="utf-8")
    code = f"from training.config import load_spec; print(ascii(load_spec({str(spec)!r}, []).results_dir))"
    env = {**os.environ, "LC_ALL": "POSIX", "PYTHONUTF8": "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.strip() == ascii("runs/Zoë")
    spec.write_text("results_dir: runs/Zoë\n", encoding="latin-1")
    with pytest.raises(ConfigError, match=r"spec\.yaml is not UTF-8 text \(byte 20\); save it as UTF-8"):
        load_spec(str(spec), [])
