"""`config.detection_zoom`: the expert also reads each crop enlarged, in four tiles of the crop's size, and its learned
map and score join the crop's own (`AnomalyAssistantModel._zoomed`), in every scoring mode; training ignores it."""

import pytest
import torch
from conftest import random_image

TILE = 64  # a 4 x 4 patch grid of 16-pixel patches


def _tiny_model():
    from assistant.backbones.tower import EfficientNetLiteVisionConfig
    from assistant.expert import ExpertConfig
    from assistant.modeling import AnomalyAssistantModel
    from assistant.testing import image_processor, tiny_config, train_tokenizer

    processor = image_processor(TILE)
    expert = ExpertConfig(feature_layers=[0, 1], embedding_dim=16, class_dim=16, predictor_dim=16, fine_stages=[1, 2])
    config = tiny_config(
        vocab_size=len(train_tokenizer()),
        vision_config=EfficientNetLiteVisionConfig(image_size=TILE),
        vision_feature_select_strategy="full",
        image_grid_pinpoints=processor.image_grid_pinpoints,
        expert_config=expert.to_dict(),
    )
    torch.manual_seed(0)
    return AnomalyAssistantModel(config).eval(), processor


def _pixels(processor, images):
    inputs = processor(images, return_tensors="pt")
    return inputs["pixel_values"], inputs["image_sizes"].tolist()


def test_zoom_tiles_cover_the_enlarged_crop_and_their_maps_land_where_they_were_read():
    from assistant.modeling import stitch_tiles, zoom_tiles

    crops = torch.randn(2, 3, TILE, TILE)
    tiles, offsets, side = zoom_tiles(crops, 2.0, 4)
    big = torch.nn.functional.interpolate(crops, size=(128, 128), mode="bicubic", align_corners=False)
    assert tiles.shape == (8, 3, TILE, TILE) and offsets == [0, 4] and side == 8
    torch.testing.assert_close(tiles[3], big[0, :, 64:, 64:])  # the first crop's bottom-right quarter
    torch.testing.assert_close(tiles[5], big[1, :, :64, 64:])  # the second crop's top-right quarter
    # below 2x the tiles overlap; the enlarged side is rounded to whole patches
    assert zoom_tiles(crops, 1.5, 4)[1:] == ([0, 2], 6)
    assert zoom_tiles(crops, 1.3, 4)[1:] == ([0, 1], 5)
    # a tower whose patches do not fill the crop (7-pixel patches, 4 of them on a 30-pixel crop): the tiles start
    # on whole patches, so their grids line up on the enlarged one
    odd, odd_offsets, odd_side = zoom_tiles(torch.randn(1, 3, 30, 30), 1.5, 4)
    assert odd.shape == (4, 3, 30, 30) and odd_offsets == [0, 2] and odd_side == 6

    maps = torch.zeros(8, 16)
    maps[3, 0] = 0.9  # crop 0, bottom-right tile, its top-left patch: the enlarged grid's (4, 4)
    maps[5, 15] = 0.7  # crop 1, top-right tile, its bottom-right patch: the enlarged grid's (3, 7)
    stitched = stitch_tiles(maps, offsets, side, 4).reshape(2, 4, 4)
    assert stitched.shape == (2, 4, 4)
    assert float(stitched[0, 2, 2]) == pytest.approx(0.9) and float(stitched[0].sum()) == pytest.approx(0.9)
    assert float(stitched[1, 1, 3]) == pytest.approx(0.7) and float(stitched[1].sum()) == pytest.approx(0.7)


def test_a_zoomed_model_joins_the_enlarged_tiles_score_and_map_to_the_crops_own():
    from assistant.expert import blend_fine
    from assistant.modeling import ZOOM_WEIGHT, stitch_tiles, zoom_tiles

    model, processor = _tiny_model()
    pixels, sizes = _pixels(processor, [random_image(TILE, TILE, seed=3)])
    with torch.no_grad():
        plain_maps, plain = model.detect(pixels, sizes)
        crop = pixels[:, 0] if pixels.dim() == 5 else pixels
        tiles, offsets, side = zoom_tiles(crop, 1.5, 4)
        tile_maps, tile_scores = model.detect(
            tiles[:, None], [(TILE, TILE)] * 4
        )  # each tile read as an image of its own
        model.config.detection_zoom = 1.5
        zoomed_maps, zoomed = model.detect(pixels, sizes)
    expected = blend_fine(plain, tile_scores.max(), ZOOM_WEIGHT)
    assert float(zoomed[0]) == pytest.approx(float(expected[0]), abs=1e-5)
    assert abs(float(zoomed[0]) - float(plain[0])) > 1e-4  # the zoom did move the score
    expected_map = blend_fine(plain_maps[0], stitch_tiles(torch.cat(tile_maps), offsets, side, 4), ZOOM_WEIGHT)
    torch.testing.assert_close(zoomed_maps[0], expected_map, atol=1e-5, rtol=1e-4)
    model.train()  # training reads the crops as given
    with torch.no_grad():
        assert float(model.detect(pixels, sizes)[1][0]) == pytest.approx(float(plain[0]), abs=1e-6)


def test_the_references_and_the_folder_read_the_learned_scores_zoomed_too():
    model, processor = _tiny_model()
    images = [random_image(TILE, TILE, seed=s) for s in range(4)]
    pixels, sizes = _pixels(processor, images)
    scores = {}
    for zoom in (1.0, 2.0):
        model.config.detection_zoom = zoom
        with torch.no_grad():
            _, zero_shot = model.detect(pixels, sizes)
            learned, _ = model.reference_learned(pixels, sizes)  # what the few-shot mode's `typical` reads
            _, few_shot = model.detect(pixels[:1], sizes[:1], pixels[1:], sizes[1:])
            _, folder, _ = model.detect_folder([(pixels, sizes)])
        # the references are read as the image is: their learned scores are its zero-shot scores
        torch.testing.assert_close(learned, zero_shot)
        scores[zoom] = (zero_shot, few_shot, folder)
    for plain, zoomed in zip(scores[1.0], scores[2.0]):
        assert torch.all((zoomed >= 0) & (zoomed <= 1)) and not torch.allclose(plain, zoomed)


def test_the_zoom_is_saved_with_the_checkpoint_and_a_bad_one_is_refused(tmp_path):
    from assistant.config import AnomalyAssistantConfig
    from assistant.modeling import AnomalyAssistantModel

    model, _ = _tiny_model()
    model.config.detection_zoom = 1.5
    model.save_pretrained(tmp_path)
    assert AnomalyAssistantModel.from_pretrained(tmp_path).config.detection_zoom == 1.5
    for bad in (0.5, 3):
        with pytest.raises(ValueError, match="detection_zoom must be between 1 and 2"):
            AnomalyAssistantConfig(detection_zoom=bad)


def test_a_large_reference_set_is_read_in_chunks_with_the_same_scores(monkeypatch):
    """Without gradients the tower reads at most `TOWER_CHUNK` crops at a time (a large reference set with the zoom's
    tiles had held every activation at once); the scores, maps and reference floor are those of one pass."""
    import assistant.modeling as modeling

    model, processor = _tiny_model()
    model.config.detection_zoom = 1.5
    images = [random_image(TILE, TILE, seed=s) for s in range(7)]
    pixels, sizes = _pixels(processor, images)
    batches = []
    tower = model.vision_tower.forward
    monkeypatch.setattr(model.vision_tower, "forward", lambda x, **k: batches.append(x.shape[0]) or tower(x, **k))
    with torch.no_grad():
        whole = model.reference_set(pixels[1:], sizes[1:])
        maps, scores = model.detect(pixels[:1], sizes[:1], pixels[1:], sizes[1:])
    assert max(batches) == 24  # the six references' zoom tiles in one pass
    monkeypatch.setattr(modeling, "TOWER_CHUNK", 5)
    batches.clear()
    with torch.no_grad():
        chunked = model.reference_set(pixels[1:], sizes[1:])
        chunked_maps, chunked_scores = model.detect(pixels[:1], sizes[:1], pixels[1:], sizes[1:])
    assert max(batches) == 5
    assert chunked.floor == pytest.approx(whole.floor, abs=1e-6)
    torch.testing.assert_close(chunked_scores, scores)
    torch.testing.assert_close(chunked_maps[0], maps[0])
    for a, b in zip(chunked.bank, whole.bank):
        torch.testing.assert_close(a, b)


def test_a_reference_bank_holds_each_distinct_patch_once():
    """An image that fits one tile gets a tile repeating its base view; the bank keeps that view's patches once, so a
    set of references holds half the rows to search, and the scores stay the same (a repeat is never nearer)."""
    from assistant.modeling import bank_rows

    model, processor = _tiny_model()
    pixels, sizes = _pixels(processor, [random_image(TILE, TILE, seed=30 + i) for i in range(4)])
    with torch.no_grad():
        _, levels, counts = model.vision_features(pixels[1:], sizes[1:])
        bank = model.reference_bank(pixels[1:], sizes[1:])
        maps, scores = model.detect(pixels[:1], sizes[:1], reference_bank=bank)
        every = [bank_rows(level) for level in levels]  # the base views and their repeats
        every_maps, every_scores = model.detect(pixels[:1], sizes[:1], reference_bank=every)
    assert counts == [2, 2, 2]
    assert bank[0].shape[0] == every[0].shape[0] // 2 == torch.unique(every[0], dim=0).shape[0]
    torch.testing.assert_close(scores, every_scores)
    torch.testing.assert_close(maps[0], every_maps[0])


def test_an_image_larger_than_the_crop_is_zoomed_from_its_own_pixels(tmp_path):
    """The default model's zoom reads each image's base view at 1.5x: made from the image itself when it is larger
    than the crop (its thin lines survive), the crop enlarged otherwise (the scores of such images unchanged). On 384
    px gravel crops the learned zero-shot ranking gains (crop enlarged: 0.844 image AUROC, own pixels: 1.000); the
    calibration's scoring (`train.scoring`) reads the same views, so thresholds are fitted on what inference gives."""
    import numpy as np
    from PIL import Image

    from assistant import AnomalyAssistant
    from assistant.processing import enlarge
    from data_prep.records import Record
    from eval.default_model_quality import held_out_samples
    from eval.metrics import image_auroc
    from train.scoring import score_records

    assistant = AnomalyAssistant.from_pretrained("default")
    model, processor = assistant.model, assistant.processor
    side = model.config.zoom_source_side
    assert side == 384
    small, large = random_image(256, 256, seed=1), random_image(384, 384, seed=2)
    out = processor.preprocess([small, large])
    zoom, base = out["zoom_pixel_values"], out["pixel_values"][:, 0]
    assert zoom.shape == (2, 3, side, side)
    torch.testing.assert_close(zoom[0], enlarge(base[:1], side)[0])  # no larger than the crop: as before
    ip = processor.image_processor
    own = (np.asarray(large.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255 - ip.image_mean) / ip.image_std
    torch.testing.assert_close(zoom[1], torch.from_numpy(own.transpose(2, 0, 1)).float(), atol=1e-5, rtol=0)
    assert not torch.allclose(zoom[1], enlarge(base[1:], side)[0], atol=1e-2)

    samples = list(held_out_samples(["gravel"], 16, 1, 384))
    labels = [int(sample[3]) for sample in samples]
    pixels = processor.preprocess([sample[1] for sample in samples])
    with torch.no_grad():
        _, enlarged = model.detect(pixels["pixel_values"], pixels["image_sizes"])
        _, own_scores = model.detect(
            pixels["pixel_values"], pixels["image_sizes"], zoom_pixel_values=pixels["zoom_pixel_values"]
        )
    assert image_auroc(labels, own_scores.numpy()) >= image_auroc(labels, enlarged.numpy()) + 0.05

    records = []
    for index, (_, image, *_) in enumerate(samples[:3]):
        image.save(tmp_path / f"{index}.png")
        records.append(Record(str(tmp_path / f"{index}.png"), 0, None, "gravel", "test"))
    _, fitted, _, _ = score_records(model, processor, records, 32)
    np.testing.assert_allclose(fitted, own_scores[:3].numpy(), atol=1e-5)


def test_a_large_image_is_zoomed_more_from_its_own_pixels_and_mixed_sizes_score_as_each_alone(tmp_path, monkeypatch):
    """`config.detection_zoom_max`: an image larger than the zoom's view is read at its own resolution, in whole
    patches, up to that zoom (at the default model's 256 px crop, 1.5x to 2x: 448 px at 1.75x, 512 px and more at 2x),
    the others as before; a batch or a folder of mixed sizes gives each image what it gets alone."""
    import assistant.modeling as modeling
    from assistant.config import AnomalyAssistantConfig
    from assistant.modeling import AnomalyAssistantModel
    from assistant.processing import AssistantProcessor
    from assistant.testing import train_tokenizer

    model, image_processor = _tiny_model()
    model.config.detection_zoom = 1.5
    read = []  # (images, side of the enlarged view) of each pass of the zoom
    tiles = modeling.zoom_tiles
    monkeypatch.setattr(
        modeling, "zoom_tiles", lambda c, z, p, s=None: read.append((len(c), s.shape[-1])) or tiles(c, z, p, s)
    )
    processor = AssistantProcessor(train_tokenizer(), image_processor, model.config)
    sizes = [(80, 80), (100, 120), (120, 140), (200, 160)]  # short sides: under, within one patch of, and past 2x's
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    assert [processor.preprocess([image])["zoom_pixel_values"].shape[-1] for image in images] == [96, 96, 96, 96]
    with torch.no_grad():
        before = [model.detect(**_inputs(processor, [image])) for image in images]

    model.config.detection_zoom_max = 2.0
    read.clear()
    together = processor.preprocess(images)
    assert [view.shape[-1] for view in together["zoom_pixel_values"]] == [96, 96, 112, 128]  # 16 px patches
    with torch.no_grad():
        maps, scores = model.detect(**_inputs(processor, images))
        alone = [model.detect(**_inputs(processor, [image])) for image in images]
        chunks = [tuple(_inputs(processor, images[:2]).values()), tuple(_inputs(processor, images[2:]).values())]
        folder_maps, folder_scores, _ = model.detect_folder(chunks)
        mixed_maps, mixed_scores, _ = model.detect_folder([tuple(_inputs(processor, images).values())])
    assert read[:3] == [(2, 96), (1, 112), (1, 128)]  # the batch: one pass for each side
    for index, (alone_maps, alone_score) in enumerate(alone):
        torch.testing.assert_close(scores[index : index + 1], alone_score, atol=1e-5, rtol=0)
        torch.testing.assert_close(maps[index], alone_maps[0], atol=1e-5, rtol=0)
    for index in (0, 1):  # images without more pixels: as before
        torch.testing.assert_close(maps[index], before[index][0][0], atol=1e-5, rtol=0)
    for index in (2, 3):  # read at their own resolution now
        assert (maps[index] - before[index][0][0]).abs().max() > 1e-4
    torch.testing.assert_close(mixed_scores, folder_scores, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path)
    assert AnomalyAssistantModel.from_pretrained(tmp_path).config.detection_zoom_max == 2.0
    for zoom, large in ((1.0, 2.0), (1.5, 1.2), (1.5, 3.0)):
        with pytest.raises(ValueError, match="detection_zoom"):
            AnomalyAssistantConfig(detection_zoom=zoom, detection_zoom_max=large)


def _inputs(processor, images) -> dict:
    out = processor.preprocess(images)
    return {
        "pixel_values": out["pixel_values"],
        "image_sizes": out["image_sizes"],
        "zoom_pixel_values": out["zoom_pixel_values"],
    }
