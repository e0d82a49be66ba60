"""Training configs: every recipe loads, overrides are strict, bad input is one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_names_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "python -m train" in first or "torchrun" in first or "deepspeed" in first
    cfg = load_config(recipe)
    assert isinstance(cfg, TrainConfig)


def test_deepspeed_configs_are_json_with_auto_fields():
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        values = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
        assert values["zero_optimization"]["stage"] == stage
        assert values["train_micro_batch_size_per_gpu"] == "auto"


def test_dotted_overrides_are_typed():
    cfg = load_config(
        ROOT / "configs/train/debug_tiny.yaml",
        ["lora.r=64", "trainer.lr=1e-3", "lora.modules_to_save=multi_modal_projector", "resume=true"],
    )
    assert cfg.lora.r == 64 and cfg.trainer.lr == 1e-3 and cfg.resume is True
    assert cfg.lora.modules_to_save == ["multi_modal_projector"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rr=3"], "Unknown config key: lora.rr"),
        (["nonsense=1"], "Unknown config key: nonsense"),
        (["lora.r=many"], "lora.r expects int"),
        (["trainer.max_steps.x=1"], "is not a section"),
        (["stage=stage9"], "stage must be one of"),
        (["quantization=4bit", "full=true"], "cannot be combined"),
        (["novalue"], "key=value"),
        (["data.augment_hue=0.7"], "augment_hue must be in"),
        (["data.augment_saturation=1.5"], "augment_saturation must be in"),
        (["data.augment_lighting=1.0"], "augment_lighting must be in"),
        (["data.augment_grain=-0.1"], "augment_grain must be in"),
        (["data.augment_scale=1.5"], "augment_scale must be in"),
        (["model.image_token_pooling=0"], "image_token_pooling must be"),
        (["model.init.vision_heads=3"], "vision_heads must divide"),
        (["model.init.vision_heads=0"], "vision_heads must divide"),
        (["data.synth.defect_types=[crack,dent]"], "unknown defect type 'dent'"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/train/debug_tiny.yaml", overrides)


def test_the_recipes_model_sections_are_the_librarys_configs():
    """One config per part: the recipe's expert, selector and calibration sections are the library's own classes (their
    names, defaults and checks); overrides reach them typed, and their checks fail as one-line config errors."""
    from assistant.calibration import CalibrationConfig
    from assistant.expert import ExpertConfig
    from assistant.selector import SelectorConfig

    cfg = load_config(
        ROOT / "configs/train/debug_tiny.yaml",
        [
            "model.expert.feature_layers=2,4",
            "model.expert.self_level=0",
            "model.selector.mode=topk",
            "calibration.moderate_from=1",
            "model.suspicion_marker=' with {level} marks: '",
        ],
    )
    assert isinstance(cfg.model.expert, ExpertConfig) and isinstance(cfg.model.selector, SelectorConfig)
    assert isinstance(cfg.calibration, CalibrationConfig)
    assert cfg.model.expert.feature_layers == [2, 4] and cfg.model.selector.mode == "topk"
    assert cfg.calibration.moderate_from == 1.0 and cfg.model.suspicion_marker == " with {level} marks: "
    # a field the recipe leaves out takes the library's default
    assert cfg.model.expert.reference_weight == ExpertConfig().reference_weight
    assert cfg.model.selector.num_tokens == SelectorConfig().num_tokens
    for overrides, message in (
        (["model.expert.views=tiles"], "model.expert: expert views must be 'base' or 'all'"),
        (["model.expert.self_level=4"], "model.expert: expert self_level 4 does not index the 4 feature layers"),
        (["model.selector.mode=best"], "model.selector: selector mode must be 'pool' or 'topk'"),
        (["calibration.moderate_from=0"], r"calibration: calibration moderate_from must be in \(0, 1\]"),
        (["model.expert.feature_layers=[1,x]"], r"model.expert.feature_layers\[1\] expects int"),
        (["model.expert.selector_mode=pool"], "Unknown config key: model.expert.selector_mode"),
        (["model.expert.moderate_from=0.5"], "Unknown config key: model.expert.moderate_from"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/train/debug_tiny.yaml", overrides)


def test_a_built_tower_has_the_recipes_head_count(tmp_path):
    from assistant.config import AnomalyAssistantConfig
    from train.build import init_model
    from train.config import ModelInit

    corpus = ["USER: <image> Is it anomalous? ASSISTANT: No."] * 4
    for heads, expected in ((None, 2), (1, 1)):  # default: one head per 16 of the 32 channels
        out = init_model(ModelInit(vision_heads=heads, vocab_size=300), corpus, tmp_path / f"heads{heads}")
        assert AnomalyAssistantConfig.from_pretrained(out).vision_config.num_attention_heads == expected


def test_unknown_key_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("# python -m train bad.yaml\nmodel:\n  init:\n    vison: clip\n")
    with pytest.raises(ConfigError, match="Unknown config key: model.init.vison"):
        load_config(recipe)


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "stage2",
            str(ROOT / "configs/train/debug_tiny.yaml"),
            "lora.rr=3",
            f"output_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: Unknown config key: lora.rr"
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_accepts_the_deepspeed_launchers_local_rank():
    from train.cli import parse

    cfg = parse(["--local_rank=1", "stage1", str(ROOT / "configs/train/debug_tiny.yaml"), "trainer.max_steps=3"])
    assert cfg.stage == "stage1" and cfg.trainer.max_steps == 3


def _normalised(rgb, mean, std):
    return (rgb - mean) / std


def test_stage1_flips_move_the_mask_with_the_image():
    import torch

    from train.data import Augment

    mean = torch.full((3, 1, 1), 0.5)
    std = torch.full((3, 1, 1), 0.25)
    mask = torch.zeros(8, 8)
    mask[0:2, 5:8] = 1  # an off-centre, asymmetric defect
    rgb = torch.full((2, 3, 16, 16), 0.2)
    rgb[:, :, 0:4, 10:16] = 0.9  # the same place at twice the resolution, in both crops
    pixels = _normalised(rgb, mean, std)
    torch.manual_seed(0)
    seen = set()
    for _ in range(64):
        out, out_mask = Augment(flips=True)(pixels, mask, mean, std)
        bright = (out[0, 0] * std[0] + mean[0]) > 0.5
        # the bright patch, pooled to the mask's resolution, is exactly where the transformed mask says
        assert torch.equal(bright.float().view(8, 2, 8, 2).amax((1, 3)), out_mask)
        seen.add(tuple(out_mask.flatten().tolist()))
    assert len(seen) == 8  # every flip / quarter turn occurs


def test_stage1_colour_changes_keep_grey_and_stay_in_range():
    import torch

    from train.data import Augment, hue_rotation

    mean = torch.tensor([0.48, 0.46, 0.41])[:, None, None]
    std = torch.tensor([0.27, 0.26, 0.28])[:, None, None]
    rgb = torch.rand(1, 3, 8, 8)
    rgb[..., 0, 0] = 0.6  # one grey pixel
    pixels = _normalised(rgb, mean, std)
    torch.manual_seed(1)
    out, _ = Augment(hue=0.5, saturation=0.5)(pixels, torch.zeros(4, 4), mean, std)
    back = out * std + mean
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    torch.testing.assert_close(back[0, :, 0, 0], torch.full((3,), 0.6))  # grey is unchanged
    assert (back - rgb).abs().max() > 0.05  # the colours did change
    red = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(
        hue_rotation(2 * torch.pi / 3) @ red, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0
    )  # a third of a turn: red → green


def test_stage1_uneven_lighting_is_smooth_keeps_colour_and_local_contrast():
    import torch

    from train.data import Augment

    mean = torch.full((3, 1, 1), 0.5)
    std = torch.full((3, 1, 1), 0.25)
    rgb = torch.full((1, 3, 32, 32), 0.5)
    rgb[:, 0] = 0.6  # a reddish surface
    rgb[:, :, 14:18, 14:18] = 0.2  # a small dark defect
    mask = torch.zeros(8, 8)
    mask[3:5, 3:5] = 1
    torch.manual_seed(3)
    fields = []
    for _ in range(16):
        out, out_mask = Augment(lighting=0.3)(_normalised(rgb, mean, std), mask, mean, std)
        gain = (out * std + mean) / rgb  # the per-pixel gain applied
        assert torch.equal(out_mask, mask)  # the mask does not move
        torch.testing.assert_close(gain[0, 0], gain[0, 1])  # the same on every channel: the colour is kept
        assert gain.min() >= 0.7 - 1e-5 and gain.max() <= 1.3 + 1e-5
        assert (gain[0, 0, :, 1:] - gain[0, 0, :, :-1]).abs().max() < 0.1  # smooth: no step between neighbours
        fields.append(gain[0, 0])
        inside, around = (out * std + mean)[0, 0, 15, 15], (out * std + mean)[0, 0, 15, 12]
        assert inside < around - 0.2  # the defect stays darker than its surroundings
    spread = torch.stack(fields)
    assert (spread.amax((1, 2)) - spread.amin((1, 2))).max() > 0.2  # the lighting really is uneven
    assert (spread[0] - spread[1]).abs().max() > 0.05  # drawn afresh per item


def test_stage1_grain_is_fine_luminance_noise_of_a_bounded_deviation():
    import torch

    from train.data import Augment

    mean = torch.full((3, 1, 1), 0.5)
    std = torch.full((3, 1, 1), 0.25)
    rgb = torch.full((1, 3, 64, 64), 0.5)
    rgb[:, 0] = 0.6
    mask = torch.zeros(8, 8)
    mask[3:5, 3:5] = 1
    torch.manual_seed(5)
    deviations = []
    for _ in range(32):
        out, out_mask = Augment(grain=0.08)(_normalised(rgb, mean, std), mask, mean, std)
        noise = out * std + mean - rgb
        assert torch.equal(out_mask, mask)  # the mask does not move
        torch.testing.assert_close(noise[0, 0], noise[0, 1])  # the same on every channel: luminance grain
        deviations.append(float(noise[0, 0].std()))
        if deviations[-1] > 0.02:
            near = float((noise[0, 0, :, 1:] * noise[0, 0, :, :-1]).mean() / noise[0, 0].var())
            far = float((noise[0, 0, :, 8:] * noise[0, 0, :, :-8]).mean() / noise[0, 0].var())
            assert 0.2 < near < 0.95 and abs(far) < 0.15  # fine: neighbours correlate, pixels 8 apart do not
    assert max(deviations) < 0.08 * 1.1 and max(deviations) > 0.05  # drawn in [0, 0.08]
    assert min(deviations) < 0.03  # and afresh per item, light grain too


def _defect_record(tmp_path, name: str, image, mask, defect_type: str):
    """An anomalous test record of `image` and its `mask` (uint8 arrays), written under `tmp_path`."""
    from PIL import Image

    from data_prep.records import Record

    Image.fromarray(image).save(tmp_path / f"{name}.png")
    Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
    return Record(
        image=str(tmp_path / f"{name}.png"),
        label=1,
        mask=str(tmp_path / f"{name}_mask.png"),
        category="x",
        split="test",
        defect_type=defect_type,
    )


def test_stage1_scale_enlarges_a_window_of_image_and_mask_together_on_half_the_items():
    import torch

    from train.data import Augment

    mean = torch.full((3, 1, 1), 0.5)
    std = torch.full((3, 1, 1), 0.25)
    rgb = torch.full((1, 3, 64, 64), 0.2)
    rgb[:, :, 24:40, 24:40] = 0.9  # a bright square, 16 pixels, in the middle
    mask = torch.zeros(16, 16)
    mask[6:10, 6:10] = 1  # the same square at the map's resolution
    pixels = _normalised(rgb, mean, std)
    torch.manual_seed(7)
    unchanged, sides, overlaps = 0, [], []
    for _ in range(64):
        out, out_mask = Augment(scale=1.0)(pixels, mask, mean, std)
        if torch.equal(out, pixels):
            assert torch.equal(out_mask, mask)
            unchanged += 1
            continue
        bright = ((out[0, 0] * std[0] + mean[0]) > 0.55).float()
        side = float(bright.sum()) ** 0.5
        assert 16 - 1.5 <= side <= 32 + 1.5  # enlarged by at most 2
        sides.append(side)
        # the bright square, pooled to the mask's cells, is where the enlarged mask says (up to a cell's edge)
        pooled = (bright.view(16, 4, 16, 4).mean((1, 3)) > 0.5).float()
        overlaps.append(float((pooled * out_mask).sum() / ((pooled + out_mask) > 0).sum()))
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}  # map targets stay 0/1
    assert 16 <= unchanged <= 48  # about half keep the data's scale
    assert min(sides) < 20 and max(sides) > 26  # factors drawn over the range, afresh per item
    # intersection over union of image and mask: a mask left where it was overlaps the moved square about a third
    assert min(overlaps) > 0.5 and sum(overlaps) / len(overlaps) > 0.85


def test_stage1_scaled_item_that_misses_its_defect_is_relabelled_normal(clip_llama, tmp_path):
    import numpy as np
    import torch

    from assistant import checkpoint
    from train.data import Augment, MaskedImages

    image = np.full((64, 64, 3), 100, np.uint8)
    image[0:6, 0:6] = 250  # a defect in the corner, which most enlarged windows leave out
    mask = np.zeros((64, 64), np.uint8)
    mask[0:6, 0:6] = 255
    record = _defect_record(tmp_path, "corner", image, mask, "spot")
    _, processor, _, _ = checkpoint.load(clip_llama)
    dataset = MaskedImages([record], processor, map_size=16, augment=Augment(scale=1.0))
    torch.manual_seed(0)
    labels = []
    for _ in range(40):
        item = dataset[0]
        assert float(item["labels"]) == float(item["masks"].any())  # the label follows what the window shows
        labels.append(float(item["labels"]))
    assert 0 < sum(labels) < len(labels)  # some windows keep the defect, some miss it


def test_stage1_targets_keep_thin_defects(clip_llama, tmp_path):
    """A 1-pixel scratch stays in stage 1's target and in the calibration masks at the map size."""
    import numpy as np

    from assistant import checkpoint
    from train.data import MaskedImages
    from train.scoring import score_records

    mask = np.zeros((100, 130), dtype=np.uint8)
    mask[50, 10:120] = 255  # horizontal, one pixel wide
    rows = np.arange(20, 80)
    mask[rows, rows + 20] = 255  # diagonal, one pixel wide
    record = _defect_record(tmp_path, "scratch", np.full((100, 130, 3), 128, np.uint8), mask, "scratch")
    model, processor, _, _ = checkpoint.load(clip_llama)
    target = MaskedImages([record], processor, map_size=64)[0]["masks"]
    assert target.shape == (64, 64)
    assert target[31:34].sum(1).max() >= 50  # the horizontal line crosses the map (area > 0.5 kept 2 cells of it)
    diagonal = target[13:50].amax(1)  # every row the diagonal passes through keeps a cell of it
    assert diagonal.min() == 1 and target.sum() <= 2.5 * (110 * 64 / 130 + 60 * 64 / 100)  # thin, not a blob
    # calibration (thresholds, pixel AUROC, the self-reference fit) scores against the same cells
    _, _, _, masks = score_records(model, processor, [record], 64)
    assert np.array_equal(masks[0], target.numpy() > 0.5)


def test_batched_scoring_gives_each_image_its_own_scores_and_maps(clip_llama, tmp_path):
    """Held-out scoring (calibration, the self-reference fit) batches runs of same-layout images: mixed sizes in
    any order get the scores, maps and self-reference distances that scoring one image at a time gives."""
    import numpy as np
    from PIL import Image

    from assistant import checkpoint
    from data_prep.records import Record
    from train.scoring import score_records
    from train.self_reference import self_distance_maps

    rng = np.random.default_rng(3)
    records = []
    for i, (h, w) in enumerate([(64, 64), (64, 64), (90, 160), (64, 64), (90, 160), (90, 160), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append(Record(image=str(tmp_path / f"{i}.png"), label=i % 2, mask=None, category="x", split="test"))
    model, processor, _, _ = checkpoint.load(clip_llama)
    one = score_records(model, processor, records, 32, batch_size=1)
    many = score_records(model, processor, records, 32, batch_size=3)
    assert np.array_equal(one[0], many[0])
    assert np.allclose(one[1], many[1], atol=1e-5) and np.allclose(one[2], many[2], atol=1e-5)
    assert len(set(np.round(one[1], 5))) > 1  # the images do score differently
    level = -1
    assert np.allclose(
        self_distance_maps(model, processor, records, 32, level, 3, batch_size=1),
        self_distance_maps(model, processor, records, 32, level, 3, batch_size=3),
        atol=1e-5,
    )


def test_stage1_area_targets_are_each_cells_defective_fraction(clip_llama, tmp_path):
    """`data.mask_targets=area`: soft targets, a thin scratch kept at its coverage (not 1, not thresholded away), a
    solid defect at 1, the defect's area preserved; any other value is a config error."""
    import numpy as np
    from PIL import Image

    from assistant import checkpoint
    from data_prep.records import Record
    from train.data import MaskedImages

    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[40, 8:120] = 255  # one pixel wide: half of each 2×2 cell it crosses
    mask[80:96, 32:64] = 255  # solid block on whole cells
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(tmp_path / "d.png")
    Image.fromarray(mask).save(tmp_path / "d_mask.png")
    record = Record(
        image=str(tmp_path / "d.png"),
        label=1,
        mask=str(tmp_path / "d_mask.png"),
        category="x",
        split="test",
        defect_type="scratch",
    )
    _, processor, _, _ = checkpoint.load(clip_llama)
    area = MaskedImages([record], processor, map_size=64, mask_targets="area")[0]["masks"]
    hard = MaskedImages([record], processor, map_size=64)[0]["masks"]
    assert area[20, 4:60].tolist() == [0.5] * 56 and hard[20, 4:60].tolist() == [1.0] * 56
    assert area[40:48, 16:32].min() == 1.0
    assert float(area.sum()) * 4 == pytest.approx(float((mask > 0).sum()))
    with pytest.raises(ConfigError, match="mask_targets"):
        load_config(ROOT / "configs/train/default_model.yaml", ["data.mask_targets=mean"])


def test_cache_filled_in_workers_holds_the_lazily_loaded_items(clip_llama, tmp_path):
    """`data.cache_workers`: the cache filled before training by forked processes holds exactly what `__getitem__`
    loads on first use, so the option speeds a run up without changing it. The cache keeps the crops as 8-bit
    pixels (a quarter of the memory) and gives back the processor's own values."""
    import torch

    from assistant import checkpoint
    from data_prep.readers import read_mvtec
    from data_prep.synth import SynthPlan, write_dataset
    from train.data import MaskedImages

    write_dataset(tmp_path / "d", SynthPlan(n=6, families=("pill",), size=64, seed=2, anomaly_ratio=0.5))
    records = [r for r in read_mvtec(tmp_path / "d").records if r.label is not None]
    _, processor, _, _ = checkpoint.load(clip_llama)
    lazy = MaskedImages(records, processor, map_size=32, cache=True)
    filled = MaskedImages(records, processor, map_size=32, cache=True)
    filled.fill_cache(2)
    assert len(filled._cache) == len(records) == 6
    plain = MaskedImages(records, processor, map_size=32)  # no cache: the processor's output as it is
    for index in range(len(records)):
        assert filled._cache[index]["pixel_values"].dtype == torch.uint8
        for key, value in lazy[index].items():
            assert torch.equal(value, filled[index][key]), key
            assert torch.allclose(value, plain[index][key], rtol=0, atol=1e-6), key


def test_cache_fill_drops_broken_files_and_raises_other_errors(clip_llama, tmp_path, monkeypatch):
    """The cache fill is stage 1's full check: a truncated image is dropped with the reader's message, the others stay
    in order; an error that is not a broken file (here a failing preprocessing) stops the fill instead of turning
    every image into a "skipped" line."""
    import numpy as np
    from PIL import Image

    from assistant import checkpoint
    from data_prep.records import Record
    from train.data import MaskedImages

    records = []
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        records.append(Record(image=str(tmp_path / f"{i}.png"), label=0, mask=None, category="x", split="test"))
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])
    _, processor, _, _ = checkpoint.load(clip_llama)
    dataset = MaskedImages(records, processor, map_size=16, cache=True)
    problems = dataset.fill_cache(1)
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / '1.png'}: image 1.png: unreadable image")
    assert [r.image for r in dataset.records] == [records[0].image, records[2].image] and sorted(dataset._cache) == [
        0,
        1,
    ]
    assert (
        dataset[1]["pixel_values"].mean() > dataset[0]["pixel_values"].mean()
    )  # the third (brighter) image, now second
    failing = MaskedImages(records[:1], processor, map_size=16, cache=True)
    monkeypatch.setattr(processor, "one_tile_pixels", lambda image: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        failing.fill_cache(1)


def test_cache_of_images_the_processor_tiles_holds_every_crop(clip_llama, tmp_path):
    """A square image of one anyres tile is cached straight from the processor's 8-bit resize: one view and its crop
    count, the bytes its float crops converted back would give. Wide, tall and larger images (several crops) are
    cached as all their 8-bit crops. Both come back as the processor's values."""
    import numpy as np
    import torch
    from PIL import Image

    from assistant import checkpoint
    from data_prep.records import Record
    from train.data import MaskedImages

    rng = np.random.default_rng(0)
    records = []
    sizes = {
        "wide": (40, 130),
        "tall": (150, 50),
        "large": (300, 300),
        "square": (32, 32),
        "tiled": (64, 64),
        "small": (20, 20),
    }
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        records.append(Record(image=str(tmp_path / f"{name}.png"), label=0, mask=None, category="x", split="test"))
    _, processor, _, _ = checkpoint.load(clip_llama)
    cached = MaskedImages(records, processor, map_size=32, cache=True)
    cached.fill_cache(2)
    plain = MaskedImages(records, processor, map_size=32)
    for index, record in enumerate(records):
        item, reference = cached[index], plain[index]
        assert item["pixel_values"].shape == reference["pixel_values"].shape
        assert torch.allclose(item["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-6), record.image
        one_view = record.image.endswith(("square.png", "small.png"))  # the tile is 32 px
        kept, converted = cached._cache[index], cached._compact(cached._load(index))
        assert ("crops" in kept) == one_view and kept["pixel_values"].dtype == torch.uint8, record.image
        crops = converted["pixel_values"].shape[0]
        assert torch.equal(kept["pixel_values"].expand(crops, -1, -1, -1), converted["pixel_values"])
        assert crops == (2 if one_view else len(reference["pixel_values"])) and "crops" not in item
    assert plain[2]["pixel_values"].shape[0] > 2  # the large image really is tiled
    with pytest.raises(ConfigError, match="cache_workers"):
        load_config(ROOT / "configs/train/default_model.yaml", ["data.cache_workers=-1"])


@pytest.mark.parametrize("option", ["data.augment_flips=true", "data.augment_scale=0.5"])
def test_flips_and_scale_are_refused_when_the_expert_also_scores_the_tiles(option):
    from types import SimpleNamespace

    from train.run import stage1_augment

    cfg = load_config(ROOT / "configs/train/debug_tiny.yaml", [option])
    model = SimpleNamespace(config=SimpleNamespace(), expert=SimpleNamespace(config=SimpleNamespace(views="all")))
    with pytest.raises(ConfigError, match=rf"data.{option.split('=')[0][5:]} needs the expert to score the base view"):
        stage1_augment(cfg, model)
    model.expert.config.views = "base"
    assert stage1_augment(cfg, model).active


def test_images_sorted_into_good_and_defect_folders_read_as_labelled_images(tmp_path):
    """`train.calibrate --all-images` and the other commands reading labelled images: a class folder of good/ and a
    folder per defect reads as it lies, with the masks in its ground_truth/ when there are any."""
    import shutil

    from data_prep.synth import SynthPlan, write_dataset
    from train.data import read_masked_or_fail

    write_dataset(tmp_path / "d", SynthPlan(n=6, families=("pill",), size=64, seed=2, anomaly_ratio=0.5))
    mvtec = tmp_path / "d" / "pill"
    part = tmp_path / "sorted" / "pill"
    shutil.copytree(mvtec / "test", part)
    tested = sorted(p.name for p in (mvtec / "test").rglob("*.png"))
    records, _ = read_masked_or_fail(part, masks_required=False)
    assert sorted(Path(r.image).name for r in records) == tested and {r.label for r in records} == {0, 1}
    assert all(r.mask is None for r in records) and all(r.split == "test" for r in records)
    assert {r.label for r in read_masked_or_fail(part)[0]} == {0}  # training drops the defects without masks
    shutil.copytree(mvtec / "ground_truth", part / "ground_truth")
    masked, _ = read_masked_or_fail(part)
    assert sorted(Path(r.image).name for r in masked) == tested
    assert all((r.mask is not None) == (r.label == 1) for r in masked) and {r.label for r in masked} == {0, 1}
