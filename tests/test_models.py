"""Model construction: every backbone, normalization inside, neck options, pretrained loading."""
from __future__ import annotations

import fractions

import pytest
import torch

from tests.conftest import TINY_SWIN
from training.errors import ConfigError, ReidError
from training.models import ModelArgs, available_backbones, build_model
from training.models.build import load_pretrained


def _args(backbone: str, **kw) -> ModelArgs:
    overrides = TINY_SWIN if backbone.startswith("swin") else {}
    return ModelArgs(backbone, num_classes=5, input_height=64, input_width=32, feat_dim=24, backbone_overrides=overrides, **kw)


def test_registry_lists_the_documented_backbones():
    assert available_backbones() == [
        "resnet_50", "swin_base_patch4_window7_224", "swin_small_patch4_window7_224", "swin_tiny_patch4_window7_224",
    ]


@pytest.mark.parametrize("backbone", ["resnet_50", "swin_base_patch4_window7_224", "swin_small_patch4_window7_224",
                                      "swin_tiny_patch4_window7_224"])
def test_each_backbone_trains_and_embeds(backbone):
    model = build_model(_args(backbone))
    logits, feats = model.train()(torch.rand(4, 3, 64, 32))
    assert logits.shape == (4, 5) and feats.shape == (4, 24)
    assert model.eval()(torch.rand(3, 3, 64, 32)).shape == (3, 24)


def test_full_size_swin_tiny_at_tao_input_size():
    model = build_model(ModelArgs("swin_tiny_patch4_window7_224", num_classes=3, input_height=384, input_width=128, feat_dim=1024))
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 384, 128)).shape == (1, 1024)


def test_normalization_happens_inside_the_model():
    torch.manual_seed(0)
    a = build_model(_args("resnet_50", pixel_mean=(0.4, 0.5, 0.6), pixel_std=(0.2, 0.25, 0.3))).eval()
    b = build_model(_args("resnet_50", pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("pixel_")}, strict=False)
    x = torch.rand(2, 3, 64, 32)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b((x - mean) / std), rtol=1e-4, atol=1e-5)


def test_neck_feat_and_flip_feature():
    torch.manual_seed(0)
    after = build_model(_args("swin_tiny_patch4_window7_224", neck_feat="after"))
    before = build_model(_args("swin_tiny_patch4_window7_224", neck_feat="before"))
    before.load_state_dict(after.state_dict())
    flip = build_model(_args("swin_tiny_patch4_window7_224", with_flip_feature=True))
    flip.load_state_dict(after.state_dict())
    for m in (after, before, flip):
        m.eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        pre = before(x)
        torch.testing.assert_close(after(x), after.head.bnneck(pre))
        torch.testing.assert_close(flip(x), (before.head.bnneck(pre) + after(x.flip(3))) / 2, rtol=1e-5, atol=1e-6)


def test_resnet_last_stride_doubles_the_final_map():
    sizes = {}
    for stride in (1, 2):
        backbone = build_model(_args("resnet_50", last_stride=stride)).backbone
        sizes[stride] = backbone.forward_features(torch.rand(1, 3, 64, 32)).shape[-2:]
    assert sizes[1] == (4, 2) and sizes[2] == (2, 1)


def test_self_pretrained_skips_mismatched_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_model(_args("swin_tiny_patch4_window7_224"))
    path = tmp_path / "pre.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    target_args = _args("swin_tiny_patch4_window7_224")
    target_args.num_classes = 9
    target = build_model(target_args)
    skipped = load_pretrained(target, str(path), "self")
    assert skipped == ["head.classifier.weight"]
    torch.testing.assert_close(target.backbone.patch_embed.proj.weight, source.backbone.patch_embed.proj.weight)


def test_imagenet_pretrained_loads_backbone_only(tmp_path):
    torch.manual_seed(1)
    model = build_model(_args("resnet_50"))
    path = tmp_path / "imagenet.pth"
    state = dict(model.backbone.state_dict())
    state["fc.weight"] = torch.zeros(1000, 2048)  # an ImageNet head the backbone does not have
    torch.save(state, path)
    fresh = build_model(_args("resnet_50"))
    assert load_pretrained(fresh, str(path), "imagenet") == ["fc.weight"]
    torch.testing.assert_close(fresh.backbone.conv1.weight, model.backbone.conv1.weight)


def test_unusable_pretrained_files_are_one_line_config_errors(tmp_path):
    model = build_model(_args("resnet_50"))
    junk, listing, foreign, objects = (tmp_path / n for n in ("junk.pth", "list.pth", "foreign.pth", "objects.pth"))
    junk.write_bytes(b"not a checkpoint\n")  # torch.load raised KeyError: 174812789 for this
    torch.save([1, 2], listing)
    torch.save({"a.weight": torch.zeros(3)}, foreign)
    torch.save({"x": fractions.Fraction(1, 3)}, objects)  # a pickle weights_only=True refuses to run
    expected = {
        junk: "cannot read model.pretrained_model_path .*junk.pth: not a file written by torch.save",
        listing: "list.pth holds a list, not a state dict",
        foreign: "foreign.pth shares no tensor with backbone resnet_50 \\(model.pretrain_choice=imagenet\\)",
        objects: "objects.pth: it holds Python objects besides tensors, and untrusted pickles are not run",
        tmp_path / "missing.pth": "model.pretrained_model_path .*missing.pth does not exist",
        tmp_path: "model.pretrained_model_path .* is a folder; give the weights file in it",
    }
    for path, message in expected.items():
        with pytest.raises(ConfigError if path in (listing, foreign) else ReidError, match=message) as err:
            load_pretrained(model, str(path), "imagenet")
        assert "\n" not in str(err.value)
