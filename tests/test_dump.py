"""``reid spec``: the resolved spec as YAML that loads back as the same spec."""
from pathlib import Path

import pytest

from training.cli import main
from training.config.dump import spec_yaml
from training.config.load import build_spec, load_spec, spec_to_dict

SPECS = Path(__file__).resolve().parents[1] / "specs"


@pytest.mark.parametrize("spec_file, overrides", [
    (None, []),
    (SPECS / "tao_swin_tiny.yaml", ["train.num_epochs=3", "results_dir='runs/a b: c # d'"]),
    (SPECS / "demo_synthetic.yaml", ["dataset.pixel_mean=[0.485,0.456,0.406]", "model.pretrain_choice=''"]),
    (None, ["model.backbone=resnet_50", "model.last_stride=2", "evaluate.server=host:50051", "train.gpu_ids=[0,1]"]),
])
def test_the_printed_spec_loads_back_as_the_same_spec(tmp_path, spec_file, overrides):
    spec = load_spec(spec_file, overrides)
    printed = tmp_path / "spec.yaml"
    printed.write_text(spec_yaml(spec))
    again = load_spec(printed)
    assert spec_to_dict(again) == spec_to_dict(spec)
    assert again.given_keys == spec.given_keys  # defaults stay defaults: commented out, not set


def test_set_keys_are_active_and_defaults_commented_with_their_docs():
    text = spec_yaml(build_spec({}, ["train.optim.base_lr=0.01", "model.backbone_overrides={embed_dim: 32}"]))
    lines = text.splitlines()
    assert "    base_lr: 0.01" in lines and "    # name: SGD" in lines
    assert "  backbone_overrides: {embed_dim: 32}  # extra constructor arguments for the backbone (e.g. a smaller " \
           "Swin for quick runs)" in lines
    assert "  # validation_interval: 0  # evaluate on query/test every N epochs and after the last; 0 = never" in lines


def test_reid_spec_prints_it_and_refuses_a_bad_key(capsys):
    assert main(["spec", "train.num_epochs=5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# reid spec: every key") and "  num_epochs: 5" in out.splitlines()
    assert main(["spec", "train.num_epoch=5"]) == 2
    assert capsys.readouterr().err.strip().startswith("reid spec: error: unknown key train.num_epoch")
