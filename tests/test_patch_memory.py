"""Folder zero-shot (mutual scoring) and the few-shot coreset: the math on planted data, and `inspect`'s batch mode."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from assistant.cli import main
from assistant.patch_memory import folder_relative, greedy_coreset, mutual_distance, peer_sample, reduce_bank


def test_mutual_distance_finds_the_patch_no_other_image_has():
    torch.manual_seed(0)
    normal = torch.randn(16, 32)  # 16 patch kinds every image shares
    images = normal[torch.randint(16, (6, 25))] + 0.01 * torch.randn(6, 25, 32)
    images[3, 7] = torch.randn(32) * 3  # a defect: a patch unlike any other image's
    distance = mutual_distance([images])
    assert distance.shape == (6, 25) and float(distance.min()) >= 0.0 and float(distance.max()) <= 1.0
    assert int(distance.flatten().argmax()) == 3 * 25 + 7
    assert float(distance[3, 7]) > 10 * float(distance[[0, 1, 2, 4, 5]].max())


def test_mutual_distance_ignores_a_defect_repeated_in_few_images_with_a_low_interval():
    torch.manual_seed(1)
    normal = torch.randn(8, 16)
    images = normal[torch.randint(8, (11, 9))] + 0.01 * torch.randn(11, 9, 16)
    defect = torch.randn(16) * 3
    images[0, 4] = defect  # the same defect in two images: the nearest other image has it too
    images[1, 4] = defect
    lowest_one = mutual_distance([images], lowest=0.05)[0, 4]
    wider = mutual_distance([images], lowest=0.3)[0, 4]
    assert float(lowest_one) < 0.01 < float(wider)  # only the low interval's average sees past the twin
    with pytest.raises(ValueError, match="at least two"):
        mutual_distance([images[:1]])


def test_a_large_folder_is_scored_against_one_fixed_sample_of_its_images():
    """Above `peers` + 1 images every image is compared with the same sample of the folder (linear cost): the defect
    is still found, a rerun scores the same, and an image's score is what all-pairs scoring over the sample and it
    gives."""
    torch.manual_seed(4)
    normal = torch.randn(16, 32)
    images = normal[torch.randint(16, (30, 25))] + 0.01 * torch.randn(30, 25, 32)
    chosen = peer_sample(30, peers=8)
    assert len(chosen) == 8 and torch.equal(chosen, peer_sample(30, peers=8)) and len(set(chosen.tolist())) == 8
    outside = next(i for i in range(30) if i not in chosen.tolist())
    images[outside, 7] = torch.randn(32) * 3  # a defect in an image that is not among the peers
    distance = mutual_distance([images], peers=8)
    assert torch.equal(distance, mutual_distance([images], peers=8))
    assert int(distance.flatten().argmax()) == outside * 25 + 7
    # an image outside the sample scores as it would in a folder of the sample and itself
    small = mutual_distance([images[torch.cat([chosen, torch.tensor([outside])])]], lowest=0.2)
    assert torch.allclose(distance[outside], small[-1], atol=1e-6)
    # a folder within the sample size is scored all against all, as before
    assert torch.equal(peer_sample(9, peers=8), torch.arange(9))
    with pytest.raises(ValueError, match="at least 1"):
        peer_sample(30, peers=0)


def test_one_threshold_serves_a_smooth_and_a_rough_surface_on_the_folder_relative_scale():
    """A rough surface's normal patches match each other less well than a smooth one's: here every distance in its
    folder is 4 times the smooth folder's (the same defect contrast). On raw distances its normal images score above
    the smooth surface's defect, so no threshold serves both; on the relative scale the two folders read the same."""
    torch.manual_seed(3)
    kinds = torch.randn(16, 32)
    images = kinds[torch.randint(16, (10, 25))] + 0.3 * torch.randn(10, 25, 32)
    images[0, 12] = kinds[0] + 0.7 * torch.randn(32)  # a faint defect
    smooth = mutual_distance([images])
    rough = smooth * 4
    assert float(rough.amax(-1)[1:].min()) > float(smooth.amax(-1)[0])  # no raw threshold splits both folders
    relative = {name: folder_relative(maps) for name, maps in (("smooth", smooth), ("rough", rough))}
    assert torch.allclose(relative["smooth"], relative["rough"], atol=1e-5)
    scores = relative["smooth"].amax(-1)
    assert float(scores[0]) > 0.7 > float(scores[1:].max())  # the defect's image stands out of its folder
    assert bool((relative["smooth"].flatten()[smooth.flatten().argsort()].diff() >= 0).all())  # order kept
    assert float(relative["rough"].min()) >= 0.0 and float(relative["rough"].max()) < 1.0


def test_greedy_coreset_covers_the_bank_better_than_a_random_subset():
    torch.manual_seed(2)
    bank = torch.cat([torch.randn(900, 8), torch.randn(100, 8) + 6])  # a rare cluster a random subset may miss
    chosen = greedy_coreset(bank, 50)
    assert len(set(chosen.tolist())) == 50
    covered = torch.cdist(bank, bank[chosen]).amin(1).max()
    random = torch.cdist(bank, bank[torch.randperm(1000)[:50]]).amin(1).max()
    assert covered < random
    levels = reduce_bank([bank, bank * 2], max_size=50)
    assert levels[0].shape == (50, 8) and torch.equal(levels[1], levels[0] * 2)  # rows stay aligned across levels
    # a bank up to `max_size` rows is searched whole; a larger one is cut to `size` rows
    assert reduce_bank([bank], max_size=1000, size=50)[0] is bank
    assert reduce_bank([bank], max_size=999, size=50)[0].shape == (50, 8)


@pytest.fixture
def same_part_folder(tmp_path):
    """Nine photos of 'one part': the same texture, one with a bright square."""
    rng = np.random.default_rng(0)
    texture = (rng.random((48, 48, 3)) * 80 + 60).astype(np.uint8)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(9):
        image = texture.copy()
        if i == 4:
            image[10:22, 26:38] = 250
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def read_scores(out):
    with open(out / "scores.csv", newline="") as handle:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


def test_inspect_scores_a_folder_of_eight_or_more_against_itself_and_ranks_the_odd_one_first(
    same_part_folder, clip_llama, tmp_path, capsys
):
    out = tmp_path / "report"
    assert main(["inspect", str(same_part_folder), "--model", str(clip_llama), "--out", str(out)]) == 0
    assert "each against the folder's other images" in capsys.readouterr().err
    scores = read_scores(out)
    assert max(scores, key=scores.get) == "4.png"

    single = tmp_path / "single"
    assert (
        main(
            [
                "inspect",
                str(same_part_folder),
                "--model",
                str(clip_llama),
                "--out",
                str(single),
                "--zero-shot",
                "single",
            ]
        )
        == 0
    )
    assert "each on its own" in capsys.readouterr().err


def test_inspect_batch_mode_on_one_image_says_it_scores_it_alone(same_part_folder, clip_llama, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    (same_part_folder / "4.png").rename(lone / "4.png")
    out = tmp_path / "report"
    assert main(["inspect", str(lone), "--model", str(clip_llama), "--out", str(out), "--zero-shot", "batch"]) == 0
    assert "one image: scored on its own" in capsys.readouterr().err
    assert list(read_scores(out)) == ["4.png"]


@pytest.mark.parametrize("views", ["base", "all"])
def test_reference_floor_is_each_reference_scored_against_the_others_as_detect_scores_it(clip_llama, views):
    """Three references of different sizes (anyres crops differ): the floor is the highest of each one's few-shot score
    with the other two as references, computed from two tower passes instead of one `detect` per reference."""
    from conftest import random_image

    from assistant import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained(clip_llama)
    assistant.model.expert.config.views = views
    references = [random_image(48, 48, seed=1), random_image(96, 48, seed=2), random_image(64, 80, seed=3)]
    scores = []
    for i, reference in enumerate(references):
        query = assistant.processor.preprocess([reference])
        others = assistant.processor.preprocess(references[:i] + references[i + 1 :])
        with torch.no_grad():
            _, score = assistant.model.detect(
                query["pixel_values"], query["image_sizes"], others["pixel_values"], others["image_sizes"]
            )
        scores.append(float(score[0]))
    every = assistant.processor.preprocess(references)
    floor = assistant.model.reference_floor(every["pixel_values"], every["image_sizes"])
    assert floor == pytest.approx(max(scores), abs=1e-5)
    one = assistant.processor.preprocess(references[:1])
    assert assistant.model.reference_floor(one["pixel_values"], one["image_sizes"]) is None


def test_a_large_reference_set_builds_its_coreset_once_for_every_image(clip_llama, monkeypatch):
    """Above `MAX_BANK` rows the references' bank is cut to a coreset, which costs far more than a search: it is built
    once per set of references (not once per batch of images, nor once per reference for the leave-one-out floor),
    and the images are scored against the same coreset that scoring with the references' pixels builds."""
    from conftest import random_image

    from assistant import AnomalyAssistant, patch_memory

    assistant = AnomalyAssistant.from_pretrained(clip_llama)
    model = assistant.model
    references = [random_image(48, 48, seed=10 + i) for i in range(5)]
    refs = assistant.processor.preprocess(references)
    with torch.no_grad():
        rows = model.reference_bank(refs["pixel_values"], refs["image_sizes"])[0].shape[0]
    small = rows // 2  # the coreset applies to this set
    monkeypatch.setattr(patch_memory.bank_keep, "__defaults__", (small, small))
    monkeypatch.setattr(patch_memory.reduce_bank, "__defaults__", (small, small))
    built = []
    coreset = patch_memory.greedy_coreset
    monkeypatch.setattr(patch_memory, "greedy_coreset", lambda *a, **k: built.append(1) or coreset(*a, **k))
    images = [random_image(48, 48, seed=20 + i) for i in range(5)]
    reports = assistant.detect_batch(images, references=references, batch_size=2)  # three batches
    assert len(built) == 1
    found = assistant._reference_set(references, refs)
    assert len(built) == 1 and found.floor is not None and found.bank[0].shape[0] == small
    query = assistant.processor.preprocess(images[:1])
    with torch.no_grad():
        from_pixels = model.detect(
            query["pixel_values"], query["image_sizes"], refs["pixel_values"], refs["image_sizes"]
        )
        cached = model.detect(
            query["pixel_values"], query["image_sizes"], reference_bank=found.bank, reference_typical=found.typical
        )
    assert torch.allclose(from_pixels[1], cached[1]) and torch.allclose(from_pixels[0][0], cached[0][0])
    calibration = model.config.calibration
    assert reports[0].pred_score == pytest.approx(float(calibration.raise_to(cached[1], found.floor)[0]), abs=1e-6)


def test_references_move_the_map_and_score_but_the_expert_chooses_the_look_twice_tokens():
    """Few-shot on the default model (the pill with its normal reference): the references change the map and the
    score, while the tokens the LLM looks at twice stay the ones the expert's own selection picks zero-shot, so a
    surface the references cover badly cannot steer them."""
    from assistant import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained()
    model = assistant.model
    query = assistant.processor.preprocess([Image.open("examples/pill_contamination.png").convert("RGB")])
    reference = assistant.processor.preprocess([Image.open("examples/pill_good.png").convert("RGB")])
    with torch.no_grad():
        alone = model.encode_images(query["pixel_values"], query["image_sizes"])
        few = model.encode_images(
            query["pixel_values"], query["image_sizes"], reference["pixel_values"], reference["image_sizes"]
        )
    assert torch.equal(alone.anomaly_embeds[0], few.anomaly_embeds[0])
    assert not torch.allclose(alone.crop_maps[0], few.crop_maps[0]) and float(alone.scores[0]) != float(few.scores[0])


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_folder_map_fuses_the_mutual_distance_and_the_learned_map_each_relative_to_the_folder(clip_llama, weight):
    """The folder mode's map is `reference_weight` of the mutual distance plus the rest of the expert's learned map,
    each on the folder's own scale (`folder_relative`); the score is `LEARNED_SCORE_SHARE` of each image's learned
    score, as the single-image mode gives it, plus the rest of the map's maximum (no batch calibration here)."""
    from conftest import random_image

    from assistant import AnomalyAssistant
    from assistant.patch_memory import LEARNED_SCORE_SHARE

    assistant = AnomalyAssistant.from_pretrained(clip_llama)
    model = assistant.model
    model.expert.config.reference_weight = weight
    images = [random_image(48, 48, seed=s) for s in range(5)]
    pixels = assistant.processor.preprocess(images)
    with torch.no_grad():
        maps, scores, _ = model.detect_folder([(pixels["pixel_values"], pixels["image_sizes"])])
        features, levels = model._detection_features(pixels["pixel_values"], pixels["image_sizes"])[:2]
        learned = model.expert(levels, features)[0]
    expected = (1 - weight) * folder_relative(learned) + weight * folder_relative(mutual_distance(levels))
    assert torch.allclose(torch.cat(maps), expected, atol=1e-6)
    single = torch.tensor([report.pred_score for report in assistant.detect_batch(images)])
    share = LEARNED_SCORE_SHARE
    assert 0 < share < 1
    assert torch.allclose(scores, share * single + (1 - share) * expected.amax(-1), atol=1e-5)


def test_a_folder_is_preprocessed_chunk_by_chunk_as_the_tower_reads_it(clip_llama, monkeypatch):
    """The folder mode never holds every image's pixels at once: each chunk
    is preprocessed just before the tower reads it, and the scores are those of the whole folder read in one chunk."""
    from conftest import random_image

    from assistant import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained(clip_llama)
    model = assistant.model
    images = [random_image(48, 48, seed=s) for s in range(6)]
    whole = [r.pred_score for r in assistant.detect_batch(images, zero_shot="batch", batch_size=6)]
    events = []
    preprocess, read = assistant.processor.preprocess, model._detection_features
    monkeypatch.setattr(
        assistant.processor, "preprocess", lambda *a, **k: events.append("pixels") or preprocess(*a, **k)
    )
    monkeypatch.setattr(model, "_detection_features", lambda *a, **k: events.append("tower") or read(*a, **k))
    chunked = [r.pred_score for r in assistant.detect_batch(images, zero_shot="batch", batch_size=2)]
    assert events == ["pixels", "tower"] * 3
    assert chunked == pytest.approx(whole, abs=1e-6)
