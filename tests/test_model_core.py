"""The composed model: parity with transformers, expert maps, look-twice token counts, save/load."""

import numpy as np
import pytest
import torch
from conftest import random_image

from assistant import AnomalyAssistant
from assistant.processing import as_chat

# (height, width): square, wide, tall, multi-tile and extreme aspect — every anyres path
SIZES = [(32, 32), (50, 90), (120, 40), (96, 96), (7, 200)]


@pytest.fixture(scope="module")
def llava_pair(llava_ov):
    from transformers import LlavaOnevisionForConditionalGeneration

    ours = AnomalyAssistant.from_pretrained(str(llava_ov))
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_ov).eval()
    return ours, reference


@pytest.mark.parametrize("size", SIZES)
def test_plain_llava_onevision_answers_exactly_like_transformers(llava_pair, size):
    ours, reference = llava_pair
    image = random_image(*size, seed=sum(size))
    question = "Is there a defect in this part?"
    report = ours.analyze(image, question, max_new_tokens=12)

    # transformers' own model on the same image, question and the checkpoint's chat template
    processor = ours.processor
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        chat_template=processor.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    pixels = processor.image_processor([image], return_tensors="pt")
    with torch.no_grad():
        features = reference.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"]).pooler_output
    n_tokens = sum(f.shape[0] for f in features)  # counted by transformers, not by our processor
    ids = processor.tokenizer(prompt.replace("<image>", "<image>" * n_tokens), return_tensors="pt")
    out = reference.generate(
        **ids,
        pixel_values=pixels["pixel_values"],
        image_sizes=pixels["image_sizes"],
        max_new_tokens=12,
        do_sample=False,
    )
    expected = processor.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    assert report.answer == expected
    assert report.pred_score is None and report.pred_label is None and report.anomaly_map is None


def test_parity_is_not_vacuous(llava_pair):
    """Different images give different answers, so equal answers above mean the image was read the same way."""
    ours, _ = llava_pair
    answers = {ours.analyze(random_image(*s, seed=sum(s)), "Describe it.", max_new_tokens=8).answer for s in SIZES}
    assert len(answers) >= 3


@pytest.mark.parametrize("fixture", ["clip_llama", "siglip_qwen2"])
def test_expert_map_and_score(request, fixture):
    assistant = AnomalyAssistant.from_pretrained(str(request.getfixturevalue(fixture)))
    for height, width in [(60, 80), (33, 150), (1, 1)]:
        report = assistant.detect(random_image(height, width))
        assert report.anomaly_map.shape == (height, width)
        assert report.anomaly_map.dtype == np.float32
        assert 0.0 <= report.anomaly_map.min() <= report.anomaly_map.max() <= 1.0
        assert 0.0 <= report.pred_score <= 1.0
        assert report.pred_label == (report.pred_score >= assistant.model.config.image_threshold)
        assert report.pred_mask.shape == (height, width)
        if not report.pred_label:
            assert not report.pred_mask.any() and report.boxes == []
        for box in report.boxes:
            x0, y0, x1, y1 = box["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_crop_maps_are_probabilities_per_patch(clip_llama):
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    _, visual, _ = assistant.encode(random_image(50, 90))
    patches = assistant.model.config.patches_per_side**2
    assert assistant.model.expert.config.views == "base"  # one map for the whole image
    assert visual.crop_maps[0].shape == (1, patches)
    assert torch.all((visual.crop_maps[0] > 0) & (visual.crop_maps[0] < 1))


@pytest.mark.parametrize("views", ["base", "all"])
def test_detection_path_gives_the_chat_paths_verdict(tmp_path, views):
    from assistant.expert import ExpertConfig
    from assistant.testing import tiny_assistant

    expert = ExpertConfig(feature_layers=[1, 2, 3, 4], embedding_dim=16, class_dim=16, predictor_dim=16, views=views)
    assistant = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / views, expert_config=expert.to_dict())))
    for size in [(50, 90), (96, 96)]:
        image = random_image(*size, seed=7)
        detected = assistant.detect(image)
        _, visual, _ = assistant.encode(image)
        assert detected.pred_score == pytest.approx(float(visual.scores[0]), abs=1e-5)
        crops = 1 if views == "base" else assistant.model.crops_per_image([size])[0]
        assert visual.crop_maps[0].shape[0] == crops
        np.testing.assert_allclose(detected.anomaly_map, assistant._evidence(image, visual)["anomaly_map"], atol=1e-5)


@pytest.mark.parametrize(
    "mode,views,expected",
    [("pool", "all", lambda crops: crops * 4), ("pool", "base", lambda crops: 4), ("topk", "all", lambda crops: 8)],
)
def test_selector_token_count(tmp_path, mode, views, expected):
    from assistant.expert import ExpertConfig
    from assistant.testing import tiny_assistant

    expert = ExpertConfig(feature_layers=[1, 2, 3, 4], embedding_dim=16, class_dim=16, predictor_dim=16, views=views)
    path = tiny_assistant(
        tmp_path / mode,
        expert_config=expert.to_dict(),
        selector_config={"mode": mode, "grid": 2, "num_tokens": 8, "attention_dim": 16},
    )
    assistant = AnomalyAssistant.from_pretrained(str(path))
    for size in [(32, 32), (50, 90), (120, 40)]:
        _, visual, _ = assistant.encode(random_image(*size))
        crops = assistant.model.crops_per_image([size])[0]
        assert visual.anomaly_embeds[0].shape == (expected(crops), assistant.model.config.text_config.hidden_size)
        assert assistant.processor.num_anomaly_tokens(size) == expected(crops)
        # the prompt holds exactly image + look-twice placeholders, after the marker text
        inputs = assistant._inputs([{"role": "user", "content": "Any defect?"}], random_image(*size), visual, None)
        ids = inputs["input_ids"][0]
        n_placeholders = int((ids == assistant.model.config.image_token_index).sum())
        assert n_placeholders == visual.image_embeds[0].shape[0] + expected(crops)
        assert "suspicious features:" in assistant.processor.tokenizer.decode(ids)


def test_placeholder_count_is_checked(clip_llama):
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    image = random_image(40, 40)
    _, visual, _ = assistant.encode(image)
    token = assistant.model.config.image_token_index
    ids = torch.tensor([[1, token, token, 2]])
    with pytest.raises(ValueError, match="do not match"):
        assistant.model.merge_embeddings(ids, visual)


@pytest.mark.parametrize("fixture", ["clip_llama", "siglip_qwen2", "llava_ov"])
def test_save_then_load_gives_identical_outputs(request, tmp_path, fixture):
    first = AnomalyAssistant.from_pretrained(str(request.getfixturevalue(fixture)))
    first.model.save_pretrained(tmp_path / "copy")
    first.processor.save_pretrained(tmp_path / "copy")
    second = AnomalyAssistant.from_pretrained(str(tmp_path / "copy"))
    image = random_image(50, 70, seed=3)
    a = first.analyze(image, "What do you see?", max_new_tokens=10)
    b = second.analyze(image, "What do you see?", max_new_tokens=10)
    assert a.answer == b.answer
    assert a.pred_score == b.pred_score
    if a.anomaly_map is not None:
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    config = (tmp_path / "copy" / "config.json").read_text()
    assert '"format_version": 1' in config and '"model_type": "anomaly_assistant"' in config


def test_references_change_the_map(siglip_qwen2):
    assistant = AnomalyAssistant.from_pretrained(str(siglip_qwen2))
    image = random_image(48, 48, seed=1)
    alone = assistant.detect(image)
    with_itself = assistant.detect(image, references=[image])
    with_other = assistant.detect(image, references=[random_image(48, 48, seed=2)])
    # a reference identical to the query makes every patch "seen": the map can only go down
    assert with_itself.anomaly_map.mean() < alone.anomaly_map.mean()
    assert with_other.anomaly_map.mean() > with_itself.anomaly_map.mean()


def test_multi_turn_chat_streams_and_uses_history(clip_llama):
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    image = random_image(40, 60)
    first = [{"role": "user", "content": "Is it defective?"}]
    streamed = "".join(assistant.chat(first, image, max_new_tokens=8))
    assert streamed == assistant.chat(first, image, stream=False, max_new_tokens=8)
    follow_up = first + [{"role": "assistant", "content": streamed}, {"role": "user", "content": "How severe?"}]
    prompt = assistant.processor.render(as_chat(follow_up))
    assert prompt.count("<image>") == 1 and "Is it defective?" in prompt and "How severe?" in prompt
    assert isinstance(assistant.chat(follow_up, image, stream=False, max_new_tokens=8), str)


def test_visualize_overlays_the_report(clip_llama):
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    image = random_image(64, 96)
    report = assistant.detect(image)
    picture = assistant.visualize(report)
    assert picture.width == 96 and picture.height >= 64


def _conversation(assistant, image, questions, **kwargs):
    messages, answers = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        answer = assistant.chat(messages, image, stream=False, max_new_tokens=8, **kwargs)
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


@pytest.mark.parametrize("fixture", ["clip_llama", "llava_ov"])
def test_follow_ups_reuse_the_kv_cache_and_answer_identically(request, fixture):
    path = str(request.getfixturevalue(fixture))
    cached = AnomalyAssistant.from_pretrained(path)
    uncached = AnomalyAssistant.from_pretrained(path, kv_cache_bytes=0)
    image = random_image(48, 64, seed=5)
    questions = ["Is there a defect?", "Where is it?", "How severe is it?"]
    assert _conversation(cached, image, questions) == _conversation(uncached, image, questions)
    assert cached.kv_cache.hits == 2 and uncached.kv_cache.hits == 0
    # the store holds this conversation's prompt and answers, not a re-encoded copy per turn
    assert len(cached.kv_cache) == 1 and cached.kv_cache.nbytes > 0


def test_kv_cache_eviction_and_transparent_reencode(clip_llama):
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama), kv_cache_entries=1)
    reference = AnomalyAssistant.from_pretrained(str(clip_llama), kv_cache_bytes=0)
    first, second = random_image(40, 40, seed=1), random_image(40, 40, seed=2)
    questions = ["Any defect?", "Describe it."]
    a1 = _conversation(assistant, first, questions)
    a2 = _conversation(assistant, second, questions)  # evicts the first conversation
    assert assistant.kv_cache.evictions >= 1 and len(assistant.kv_cache) == 1
    again = _conversation(assistant, first, questions)  # re-encoded, same answers
    assert a1 == again == _conversation(reference, first, questions)
    assert a2 == _conversation(reference, second, questions)


def test_sessions_keep_conversations_apart(clip_llama):
    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    image = random_image(40, 40, seed=3)
    _conversation(assistant, image, ["Any defect?"], session="alice")
    _conversation(assistant, image, ["Any defect?"], session="bob")
    assert len(assistant.kv_cache) == 2


def test_batched_detection_equals_one_at_a_time(siglip_qwen2):
    assistant = AnomalyAssistant.from_pretrained(str(siglip_qwen2))
    images = [
        random_image(h, w, seed=i) for i, (h, w) in enumerate([(40, 40), (50, 90), (120, 40), (33, 33), (64, 48)])
    ]
    batched = assistant.detect_batch(images, batch_size=3)
    for image, report in zip(images, batched):
        single = assistant.detect(image)
        assert report.pred_score == pytest.approx(single.pred_score, abs=1e-5)
        np.testing.assert_allclose(report.anomaly_map, single.anomaly_map, atol=1e-5)
        assert report.anomaly_map.shape == (image.height, image.width)


def test_an_anomalous_verdict_always_says_where_even_when_only_a_speck_passes(tmp_path, monkeypatch):
    import assistant.inference as inference
    from assistant.testing import tiny_assistant

    assistant = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / "m")))
    assistant.model.config.image_threshold = 0.0  # every image is anomalous
    assistant.model.config.pixel_threshold = 2.0  # no pixel passes: the peak region is used

    def one_hot_peak(maps, size, *args):
        amap = torch.zeros(size)
        amap[size[0] - 3, 2] = 1.0  # a single-pixel peak near the lower left, below the boxes' minimum area
        return amap

    monkeypatch.setattr(inference, "image_anomaly_map", one_hot_peak)
    report = assistant.detect(random_image(96, 96, seed=3))
    assert report.pred_label
    assert report.boxes[0]["box"] == [2, 93, 3, 94]
    assert report.location == "lower left"


def test_the_location_words_place_the_top_region_by_its_centre_of_mass(tmp_path, monkeypatch):
    """An irregular region is placed where its pixels are, as a ground-truth mask is, not at its box's middle."""
    import assistant.inference as inference
    from assistant.localize import location_words
    from assistant.testing import tiny_assistant

    assistant = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / "m")))
    assistant.model.config.image_threshold = 0.0  # every image is anomalous
    assistant.model.config.pixel_threshold = 0.5
    shape = np.zeros((96, 96), dtype=bool)
    shape[:30, :30] = True  # a blob in the upper left ...
    shape[:2, :] = shape[:, :2] = True  # ... with thin arms along two edges: its box is the whole image
    speck = np.zeros((96, 96), dtype=bool)
    speck[80:83, 80:83] = True  # a weaker second region in the lower right

    def fake_map(maps, size, *args):
        return torch.from_numpy(shape * 0.9 + speck * 0.6).float()

    monkeypatch.setattr(inference, "image_anomaly_map", fake_map)
    report = assistant.detect(random_image(96, 96, seed=3))
    assert report.boxes[0]["box"] == [0, 0, 96, 96] and len(report.boxes) == 2
    assert location_words(report.boxes[0]["box"], 96, 96) == "center"  # the box's middle would say this
    assert report.location == location_words(shape) == "upper left"
    assert location_words(report.boxes[0]["center"], 96, 96) == "upper left"  # a point [x, y] in pixels
    assert location_words([90, 5], 96, 96) == "upper right" and location_words([5, 40], 96, 48) == "lower left"


def test_token_pooling_shortens_what_the_llm_reads_and_leaves_detection_alone(tmp_path):
    from assistant.testing import tiny_assistant

    full = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / "full", seed=3)))
    pooled = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / "pooled", seed=3, image_token_pooling=2)))
    side = full.model.config.patches_per_side
    for size in SIZES:
        image = random_image(*size, seed=5)
        _, visual_full, _ = full.encode(image)
        _, visual_pooled, _ = pooled.encode(image)
        n_full, n_pooled = visual_full.image_embeds[0].shape[0], visual_pooled.image_embeds[0].shape[0]
        # the processor's placeholder count follows the pooling (a mismatch would fail merge_embeddings in chat)
        assert n_pooled == pooled.processor.num_image_tokens(size) < n_full == full.processor.num_image_tokens(size)
        # the expert still scores every patch of the full grid: same map, same score
        assert torch.equal(visual_pooled.crop_maps[0], visual_full.crop_maps[0])
        assert float(visual_pooled.scores[0]) == float(visual_full.scores[0])
        assert isinstance(
            pooled.chat([{"role": "user", "content": "Is it defective?"}], image, stream=False, max_new_tokens=4), str
        )
    # pooled base-view tokens are the bilinear resize of the full grid's (LLaVA-OneVision's video pooling)
    image = random_image(32, 32, seed=5)
    _, visual_full, _ = full.encode(image)
    _, visual_pooled, _ = pooled.encode(image)
    grid = visual_full.image_embeds[0][: side * side].T.reshape(1, -1, side, side)
    expected = torch.nn.functional.interpolate(grid, size=(-(-side // 2),) * 2, mode="bilinear").flatten(2)[0].T
    torch.testing.assert_close(visual_pooled.image_embeds[0][: expected.shape[0]], expected)


def test_bad_token_pooling_is_refused():
    from assistant.config import AnomalyAssistantConfig

    with pytest.raises(ValueError, match="image_token_pooling"):
        AnomalyAssistantConfig(image_token_pooling=0)


@pytest.mark.parametrize("views", ["base", "all"])
def test_detection_views_average_the_turned_views_and_make_the_verdict_mirror_proof(tmp_path, views):
    from assistant.expert import ExpertConfig
    from assistant.modeling import map_back
    from assistant.testing import tiny_assistant

    expert = ExpertConfig(
        feature_layers=[1, 2, 3, 4], embedding_dim=16, class_dim=16, predictor_dim=16, views=views
    ).to_dict()
    one = AnomalyAssistant.from_pretrained(str(tiny_assistant(tmp_path / "one", seed=4, expert_config=expert)))
    eight = AnomalyAssistant.from_pretrained(
        str(tiny_assistant(tmp_path / "eight", seed=4, expert_config=expert, detection_views=8))
    )
    two = AnomalyAssistant.from_pretrained(
        str(tiny_assistant(tmp_path / "two", seed=4, expert_config=expert, detection_views=2))
    )
    assert (
        AnomalyAssistant.from_pretrained(str(tmp_path / "eight")).model.config.detection_views == 8
    )  # saved with the checkpoint
    image = random_image(64, 64, seed=9)  # two crops: the "all" path scores the base view and a tile
    pixels = one.processor.preprocess([image])
    sizes = pixels["image_sizes"].tolist()

    def detect(assistant, pixel_values):
        with torch.no_grad():
            maps, scores = assistant.model.detect(pixel_values, sizes)
        return maps[0], float(scores[0])

    # two views: the mean of the crops' and the mirrored crops' maps (mirrored back) and scores
    (plain_map, plain), (mirror_map, mirror) = (
        detect(one, pixels["pixel_values"]),
        detect(one, pixels["pixel_values"].flip(-1)),
    )
    two_map, two_score = detect(two, pixels["pixel_values"])
    assert two_score == pytest.approx((plain + mirror) / 2, abs=1e-6)
    torch.testing.assert_close(two_map, (plain_map + map_back(mirror_map, 0, True)) / 2)
    assert mirror != pytest.approx(plain, abs=1e-4)  # the views do differ

    # all eight: mirrored or turned crops get the same score and the mirrored / turned map
    eight_map, eight_score = detect(eight, pixels["pixel_values"])
    for turns, mirrored in [(0, True), (1, False), (3, True)]:
        pv = torch.rot90(pixels["pixel_values"], turns, dims=(-2, -1))
        view_map, view_score = detect(eight, pv.flip(-1) if mirrored else pv)
        assert view_score == pytest.approx(eight_score, abs=1e-6)
        torch.testing.assert_close(map_back(view_map, turns, mirrored), eight_map)
    # for a user: the mirror image gets the same verdict score (to the resampling's rounding), a single view does not
    assert eight.detect(image.transpose(0)).pred_score == pytest.approx(eight.detect(image).pred_score, abs=1e-3)
    assert abs(one.detect(image.transpose(0)).pred_score - one.detect(image).pred_score) > 1e-3

    # the chat path reports the same evidence; its look-twice tokens stay those of the image as given
    _, visual_eight, _ = eight.encode(image)
    _, visual_one, _ = one.encode(image)
    assert float(visual_eight.scores[0]) == pytest.approx(eight_score, abs=1e-6)
    torch.testing.assert_close(visual_eight.anomaly_embeds[0], visual_one.anomaly_embeds[0])
    eight.model.train()  # training scores the crops as given
    assert detect(eight, pixels["pixel_values"])[1] == pytest.approx(plain, abs=1e-6)


def test_bad_detection_views_are_refused():
    from assistant.config import AnomalyAssistantConfig

    with pytest.raises(ValueError, match="detection_views"):
        AnomalyAssistantConfig(detection_views=3)


def test_a_tile_that_repeats_the_base_view_is_read_once_with_the_same_features_and_gradients(clip_llama, monkeypatch):
    from assistant.modeling import AnomalyAssistantModel

    assistant = AnomalyAssistant.from_pretrained(str(clip_llama))
    model = assistant.model
    square, multi = random_image(32, 32, seed=2), random_image(96, 96, seed=2)  # one tile (= the base view); 3x3 tiles
    inputs = assistant.processor.image_processor([square, multi], return_tensors="pt")
    sizes = inputs["image_sizes"].tolist()
    counts = model.crops_per_image(sizes)
    read = []
    hook = model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(len(args[0])), with_kwargs=True
    )

    def run():
        model.zero_grad()
        features, levels, _ = model.vision_features(inputs["pixel_values"], sizes)
        (features.square().sum() + sum(level.sum() for level in levels)).backward()
        grads = {n: p.grad.clone() for n, p in model.vision_tower.named_parameters() if p.grad is not None}
        return features.detach(), [level.detach() for level in levels], grads

    try:
        shared = run()
        monkeypatch.setattr(AnomalyAssistantModel, "_distinct_crops", staticmethod(lambda crops, counts: (None, None)))
        every = run()
    finally:
        hook.remove()
    assert counts[0] == 2 and read == [sum(counts) - 1, sum(counts)]  # the square image's tile was not read again
    torch.testing.assert_close(shared[0], every[0])
    for a, b in zip(shared[1], every[1]):
        torch.testing.assert_close(a, b)
    assert shared[2].keys() == every[2].keys() and shared[2]
    for name in shared[2]:
        torch.testing.assert_close(shared[2][name], every[2][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["clip_llama", "siglip_qwen2"])
def test_preprocessing_gives_the_image_processors_pixels_for_every_layout(request, fixture):
    assistant = AnomalyAssistant.from_pretrained(str(request.getfixturevalue(fixture)))
    processor = assistant.processor
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]  # the tile is 32 px: 96x96 is 3x3 tiles
    images += [
        random_image(20, 20, seed=7),
        random_image(20, 20, seed=8, mode="L"),
        random_image(24, 24, seed=9, mode="RGBA"),
    ]
    one_tile = [im for im in images if processor._one_tile_crops([im]) is not None]
    assert one_tile == [images[0], images[5]]  # the shortcut is taken (RGB squares of one tile) ...
    for image in images:  # ... and every image, shortcut or not, gets the processor's pixels exactly
        ours, theirs = processor.preprocess([image]), processor.image_processor([image], return_tensors="pt")
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]) and torch.equal(
            ours["image_sizes"], theirs["image_sizes"]
        )
    ours, theirs = processor.preprocess(one_tile), processor.image_processor(one_tile, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"]) and torch.equal(
        ours["image_sizes"], theirs["image_sizes"]
    )


def test_preprocessing_falls_back_to_the_processor_when_the_shortcut_disagrees(clip_llama, monkeypatch):
    from types import SimpleNamespace

    from assistant import processing

    processor = AnomalyAssistant.from_pretrained(str(clip_llama)).processor
    image = random_image(32, 32, seed=4)
    monkeypatch.setattr(
        processing, "np", SimpleNamespace(asarray=lambda im: np.asarray(im)[::-1], stack=np.stack)
    )  # upside down
    ours, theirs = processor.preprocess([image]), processor.image_processor([image], return_tensors="pt")
    assert processor._one_tile_checked is False and torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert processor._one_tile_crops([image]) is None  # it stays off for this processor
