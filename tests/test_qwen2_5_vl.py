"""Qwen2.5-VL as a base: a plain checkpoint answers like transformers; the expert composes with its tower."""

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from assistant import AnomalyAssistant

# (height, width): square, wide, tall, one that the pixel bound shrinks, and an extreme aspect ratio
SIZES = [(56, 56), (50, 90), (120, 40), (260, 230), (30, 300)]


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    from assistant.testing import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("ckpt") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen_pair(qwen_base):
    from transformers import Qwen2_5_VLForConditionalGeneration

    ours = AnomalyAssistant.from_pretrained(str(qwen_base))
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_base).eval()
    return ours, reference


@pytest.fixture(scope="module")
def qwen_expert(qwen_base, tmp_path_factory):
    """The plain base with a freshly initialised expert and selector, saved in this project's layout."""
    from assistant import checkpoint
    from assistant.expert import ExpertConfig
    from assistant.qwen import QwenProcessor
    from assistant.selector import SelectorConfig

    model, processor, generation, _ = checkpoint.load(qwen_base)
    model.config.expert_grid = 8
    expert = ExpertConfig(
        feature_layers=[1, 2, 3, 4], embedding_dim=16, class_dim=16, predictor_dim=16, logit_scale=10.0
    )
    checkpoint.add_expert(model, expert, SelectorConfig(attention_dim=16), seed=0)
    model.config.suspicion_bounds = (0.25, 0.5)
    out = tmp_path_factory.mktemp("ckpt") / "qwen-expert"
    model.save_pretrained(out)
    QwenProcessor(
        processor.tokenizer, processor.image_processor, model.config, processor.chat_template
    ).save_pretrained(out)
    generation.save_pretrained(out)
    return out


def _transformers_answer(ours, reference, image, question, max_new_tokens, content=None):
    """transformers' own model on the image, the question and the checkpoint's chat template (`content`: the user
    turn's parts, images in the order of the list `image`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = ours.processor.tokenizer
    images = image if isinstance(image, list) else [image]
    content = content or [{"type": "image"}, {"type": "text", "text": question}]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=ours.processor.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    pixels = Qwen2VLImageProcessorPil.from_pretrained(ours.name)(images, return_tensors="pt")
    with torch.no_grad():
        features = reference.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output
    pieces = prompt.split("<|image_pad|>")  # one pad per image, expanded to the count transformers gives each
    prompt = pieces[0] + "".join("<|image_pad|>" * f.shape[0] + piece for f, piece in zip(features, pieces[1:]))
    ids = tokenizer(prompt, return_tensors="pt")
    types = (ids["input_ids"] == reference.config.image_token_id).int()
    out = reference.generate(
        **ids,
        pixel_values=pixels["pixel_values"],
        image_grid_thw=pixels["image_grid_thw"],
        mm_token_type_ids=types,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("size", SIZES)
def test_plain_qwen2_5_vl_answers_exactly_like_transformers(qwen_pair, size):
    ours, reference = qwen_pair
    image = random_image(*size, seed=sum(size))
    question = "Is there a defect in this part?"
    report = ours.analyze(image, question, max_new_tokens=12)
    assert ours.kind == "qwen2_5_vl"
    assert report.answer == _transformers_answer(ours, reference, image, question, 12)
    assert report.pred_score is None and report.anomaly_map is None


def test_parity_is_not_vacuous(qwen_pair):
    """Different images give different answers, so equal answers above mean the image was read the same way."""
    ours, _ = qwen_pair
    answers = {ours.analyze(random_image(*s, seed=sum(s)), "Describe it.", max_new_tokens=8).answer for s in SIZES}
    assert len(answers) >= 3


def test_follow_ups_reuse_the_kv_cache_and_answer_identically(qwen_base):
    cached = AnomalyAssistant.from_pretrained(str(qwen_base))
    uncached = AnomalyAssistant.from_pretrained(str(qwen_base), kv_cache_bytes=0)
    other = random_image(70, 40, seed=9)
    image = random_image(48, 64, seed=5)

    def conversation(assistant, picture):
        messages, answers = [], []
        for question in ["Is there a defect?", "Where is it?", "How severe is it?"]:
            messages.append({"role": "user", "content": question})
            answers.append(assistant.chat(messages, picture, stream=False, max_new_tokens=8))
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    first = conversation(cached, image)
    conversation(cached, other)  # another image in between: its rotary offsets must not leak into the first's cache
    assert first == conversation(uncached, image)
    assert conversation(cached, image)[1:] == first[1:] and cached.kv_cache.hits >= 4


def test_patch_grid_keeps_the_image_layout(qwen_pair):
    """A single bright patch lands at its own grid cell after the tower's window order is undone."""
    ours = qwen_pair[0]
    model = ours.model
    pixels = np.zeros((56, 112, 3), dtype=np.uint8)
    pixels[14:28, 70:84] = 255  # patch row 1, column 5 of a 4×8 grid (56×112 needs no resize)
    image = Image.fromarray(pixels)
    inputs = ours.processor.preprocess([image])
    grid = model.config.grid_thw(inputs["image_sizes"].tolist())
    assert grid.tolist() == [[1, 4, 8]]
    with torch.no_grad():
        hidden = model.vision_tower(inputs["pixel_values"], grid_thw=grid, output_hidden_states=True).hidden_states
        model.config.expert_grid = 8  # a square grid the 4×8 patches stretch to: each row doubled
        try:
            cells = model._patch_grids([hidden[0]], grid)[0][0].reshape(8, 8, -1)
        finally:
            model.config.expert_grid = 24
    distance = (cells - cells[0, 0]).norm(dim=-1)
    rows, cols = torch.nonzero(distance > distance.max() / 2, as_tuple=True)
    assert set(rows.tolist()) <= {2, 3} and set(cols.tolist()) == {5}


def test_the_expert_gives_score_map_boxes_and_look_twice_tokens(qwen_expert):
    assistant = AnomalyAssistant.from_pretrained(str(qwen_expert))
    assert assistant.kind == "assistant" and assistant.has_expert
    config = assistant.model.config
    for height, width in [(60, 80), (33, 150), (200, 120)]:
        image = random_image(height, width, seed=height)
        report = assistant.analyze(image, "Any defect?", max_new_tokens=4)
        assert 0.0 <= report.pred_score <= 1.0 and report.pred_label == (report.pred_score >= config.image_threshold)
        assert report.anomaly_map.shape == (height, width) and report.pred_mask.shape == (height, width)
        assert assistant.visualize(report).width == width
        detected = assistant.detect(image)
        assert detected.pred_score == pytest.approx(report.pred_score, abs=1e-5)
        np.testing.assert_allclose(detected.anomaly_map, report.anomaly_map, atol=1e-5)
        # the prompt holds the image's tokens, then the marker, then the look-twice tokens
        _, visual, pixels = assistant.encode(image)
        inputs = assistant._inputs([{"role": "user", "content": "Any defect?"}], image, visual, pixels)
        ids = inputs["input_ids"][0]
        image_token = config.image_token_index
        n_image, n_look = visual.image_embeds[0].shape[0], visual.anomaly_embeds[0].shape[0]
        assert n_look == assistant.processor.num_anomaly_tokens((height, width)) == 4
        assert int((ids == image_token).sum()) == n_image + n_look
        types = assistant.model.token_types(inputs["input_ids"])[0]
        assert int(types.sum()) == n_image  # look-twice tokens take text positions
        text = assistant.processor.tokenizer.decode(ids)
        assert text.index("suspicious features:") > text.index("<|image_pad|>")
        assert text.rindex("<|image_pad|>") > text.index("suspicious features:")
    # references of the same image make every patch "seen"
    image = random_image(56, 56, seed=1)
    assert assistant.detect(image, references=[image]).anomaly_map.mean() < assistant.detect(image).anomaly_map.mean()
    # references of different sizes are scored against each other as `detect` scores an image (the few-shot floor)
    others = [random_image(56, 56, seed=2), random_image(84, 56, seed=3)]
    single = [assistant.processor.preprocess([o]) for o in others]
    with torch.no_grad():
        pair = [
            float(
                assistant.model.detect(a["pixel_values"], a["image_sizes"], b["pixel_values"], b["image_sizes"])[1][0]
            )
            for a, b in ((single[0], single[1]), (single[1], single[0]))
        ]
    both = assistant.processor.preprocess(others)
    assert assistant.model.reference_floor(both["pixel_values"], both["image_sizes"]) == pytest.approx(
        max(pair), abs=1e-5
    )


def test_expert_checkpoint_saves_and_loads_identically(qwen_expert, tmp_path):
    first = AnomalyAssistant.from_pretrained(str(qwen_expert))
    first.model.save_pretrained(tmp_path / "copy")
    first.processor.save_pretrained(tmp_path / "copy")
    second = AnomalyAssistant.from_pretrained(str(tmp_path / "copy"))
    image = random_image(50, 70, seed=3)
    a = first.analyze(image, "What do you see?", max_new_tokens=8)
    b = second.analyze(image, "What do you see?", max_new_tokens=8)
    assert (a.answer, a.pred_score) == (b.answer, b.pred_score)
    assert '"model_type": "anomaly_assistant_qwen2_5_vl"' in (tmp_path / "copy" / "config.json").read_text()


def test_training_forward_gives_a_loss_with_gradients(qwen_expert):
    """The causal-LM loss through the base's rotary positions, right-padded like the training collator."""
    assistant = AnomalyAssistant.from_pretrained(str(qwen_expert))
    model = assistant.model.train()
    image = random_image(60, 80)
    _, visual, pixels = assistant.encode(image)
    inputs = assistant._inputs(
        [{"role": "user", "content": "Any defect?"}, {"role": "assistant", "content": "No."}], image, visual, pixels
    )
    ids = torch.nn.functional.pad(inputs["input_ids"], (0, 3), value=0)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 3), value=0)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(
        input_ids=ids,
        pixel_values=pixels["pixel_values"],
        image_sizes=pixels["image_sizes"],
        attention_mask=mask,
        labels=labels,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.selector.query_proj.weight.grad is not None and model.language_model.lm_head.weight.grad is not None


def test_a_folder_of_another_family_is_refused_in_one_line(tmp_path):
    from assistant.checkpoint import ModelLoadError, load

    (tmp_path / "config.json").write_text('{"model_type": "qwen3_vl"}')
    with pytest.raises(ModelLoadError, match="expected anomaly_assistant, llava_onevision or qwen2_5_vl"):
        load(tmp_path)


@pytest.mark.slow
def test_both_training_stages_on_a_qwen_base_then_merge(tmp_path):
    """`python -m train` with `model.path` at a plain Qwen2.5-VL checkpoint: stage 1 (expert) then stage 2 (LoRA); the
    merged checkpoint answers as base + adapter do, with a score, a map and boxes."""
    from assistant.testing import tiny_qwen2_5_vl
    from train.build import instruction_corpus, synthetic_data
    from train.config import load_config
    from train.merge import assistant_with_adapter, merge
    from train.run import run

    recipe = "configs/train/debug_tiny.yaml"
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "data.synth.n=8",
        "data.synth.families=[wood]",
        "stage1_steps=4",
        "trainer.max_steps=2",
        "trainer.save_steps=2",
        "trainer.logging_steps=1",
        "model.expert.feature_layers=[2,4]",
    ]
    _, instructions = synthetic_data(load_config(recipe, overrides), tmp_path / "run" / "data")
    base = tiny_qwen2_5_vl(tmp_path / "base", corpus=instruction_corpus(instructions), vocab_size=500)
    results = run(load_config(recipe, [*overrides, f"model.path={base}"]))
    stage1 = AnomalyAssistant.from_pretrained(str(results["stage1"]))
    assert stage1.kind == "assistant" and 0.0 < stage1.model.config.image_threshold < 1.0
    assert (results["stage2"] / "adapter_model.safetensors").is_file()

    merged = AnomalyAssistant.from_pretrained(str(merge(results["stage2"], tmp_path / "merged")))
    unmerged = assistant_with_adapter(results["stage2"])
    image = random_image(64, 64, seed=4)
    a, b = merged.analyze(image, max_new_tokens=6), unmerged.analyze(image, max_new_tokens=6)
    assert a.answer == b.answer and a.pred_score == pytest.approx(b.pred_score, abs=1e-5)
    assert a.anomaly_map.shape == (64, 64) and a.pred_label == (a.pred_score >= merged.model.config.image_threshold)
    assert (len(a.boxes) > 0) == a.pred_label


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["qlora", "full"])
def test_stage2_qlora_and_full_on_a_qwen_base(tmp_path, mode):
    from assistant import checkpoint
    from assistant.expert import ExpertConfig
    from assistant.selector import SelectorConfig
    from assistant.testing import tiny_qwen2_5_vl
    from train.build import instruction_corpus, load_model, synthetic_data
    from train.config import load_config
    from train.run import run

    recipe = "configs/train/debug_tiny.yaml"
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "data.synth.n=8",
        "data.synth.families=[wood]",
        "stage=stage2",
        "trainer.max_steps=2",
        "trainer.save_steps=2",
        "trainer.logging_steps=1",
    ]
    _, instructions = synthetic_data(load_config(recipe, overrides), tmp_path / "run" / "data")
    plain = tiny_qwen2_5_vl(tmp_path / "plain", corpus=instruction_corpus(instructions), vocab_size=500, text_hidden=64)
    model, processor, _, _ = checkpoint.load(plain)
    model.config.expert_grid = 8
    checkpoint.add_expert(
        model,
        ExpertConfig(feature_layers=[2, 4], embedding_dim=16, class_dim=16, predictor_dim=16),
        SelectorConfig(attention_dim=16),
        seed=0,
    )
    model.save_pretrained(tmp_path / "base")
    type(processor)(
        processor.tokenizer, processor.image_processor, model.config, processor.chat_template
    ).save_pretrained(tmp_path / "base")
    if mode == "qlora":
        bnb = pytest.importorskip("bitsandbytes")
        quantised = [
            n
            for n, m in load_model(tmp_path / "base", quantize=True)[0].named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        ]
        assert quantised and all(n.startswith("language_model.model.language_model.") for n in quantised)
    extra = ["quantization=4bit"] if mode == "qlora" else ["full=true"]
    if (
        mode == "full"
    ):  # a template without `{% generation %}` marks (Qwen's own) is refused in one line, before training
        import shutil

        from train.config import ConfigError

        shutil.copytree(tmp_path / "base", tmp_path / "unmarked")
        template = (tmp_path / "unmarked" / "chat_template.jinja").read_text()
        unmarked = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        (tmp_path / "unmarked" / "chat_template.jinja").write_text(unmarked)
        with pytest.raises(ConfigError, match="marks no assistant text"):
            run(load_config(recipe, [*overrides, f"model.path={tmp_path / 'unmarked'}", *extra]))
    result = run(load_config(recipe, [*overrides, f"model.path={tmp_path / 'base'}", *extra]))["stage2"]
    if mode == "full":
        trained = AnomalyAssistant.from_pretrained(str(result))
        report = trained.analyze(random_image(64, 64), max_new_tokens=4)
        assert report.pred_score is not None and report.anomaly_map.shape == (64, 64)
    else:
        assert (result / "adapter_model.safetensors").is_file()


def test_references_shown_to_the_llm_as_images_answer_like_transformers(qwen_pair):
    """Off by default; on, the reference comes first in the user turn, as transformers reads two images."""
    from assistant.processing import REFERENCES_NOTE

    ours, reference = qwen_pair
    image, normal = random_image(50, 90, seed=1), random_image(60, 60, seed=2)
    question = "Is there a defect in this part?"
    alone = ours.analyze(image, question, max_new_tokens=12)
    assert ours.analyze(image, question, references=[normal], max_new_tokens=12).answer == alone.answer  # off: unseen
    ours.model.config.references_as_images = 1
    try:
        shown = AnomalyAssistant(ours.model, ours.processor, ours.generation_config, ours.name, ours.kind)
        answer = shown.analyze(image, question, references=[normal, random_image(40, 40)], max_new_tokens=12).answer
    finally:
        ours.model.config.references_as_images = 0
    content = [
        {"type": "image"},
        {"type": "text", "text": REFERENCES_NOTE},
        {"type": "image"},
        {"type": "text", "text": question},
    ]
    assert answer == _transformers_answer(ours, reference, [normal, image], question, 12, content)
    assert answer != alone.answer


def test_references_as_images_with_the_expert(qwen_expert):
    assistant = AnomalyAssistant.from_pretrained(str(qwen_expert))
    assistant.model.config.references_as_images = 1
    image, normal = random_image(60, 80, seed=3), random_image(56, 56, seed=4)
    report = assistant.analyze(image, "Any defect?", references=[normal], max_new_tokens=4)
    assert report.anomaly_map.shape == (60, 80)
    _, visual, pixels = assistant.encode(image, [normal])
    ids = assistant._inputs([{"role": "user", "content": "Any defect?"}], image, visual, pixels)["input_ids"]
    assert int((ids == assistant.model.config.vision_start_token_id).sum()) == 2
    # the expert still scores the image asked about, against the reference
    assert report.pred_score == pytest.approx(assistant.detect(image, references=[normal]).pred_score, abs=1e-5)


def test_a_plain_base_saved_in_this_projects_layout_answers_the_same(qwen_pair, tmp_path):
    ours = qwen_pair[0]
    ours.model.save_pretrained(tmp_path / "copy")
    ours.processor.save_pretrained(tmp_path / "copy")
    again = AnomalyAssistant.from_pretrained(str(tmp_path / "copy"))
    assert again.kind == "assistant" and not again.has_expert
    for size in [(50, 90), (120, 40)]:
        image = random_image(*size, seed=1)
        assert (
            again.analyze(image, "Describe.", max_new_tokens=10).answer
            == ours.analyze(image, "Describe.", max_new_tokens=10).answer
        )


def test_follow_ups_with_look_twice_tokens_reuse_the_kv_cache(qwen_expert):
    cached = AnomalyAssistant.from_pretrained(str(qwen_expert))
    uncached = AnomalyAssistant.from_pretrained(str(qwen_expert), kv_cache_bytes=0)
    image = random_image(60, 80, seed=6)

    def conversation(assistant):
        messages, answers = [], []
        for question in ["Any defect?", "Where?", "How severe?"]:
            messages.append({"role": "user", "content": question})
            answers.append(assistant.chat(messages, image, stream=False, max_new_tokens=6, min_new_tokens=6))
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    assert conversation(cached) == conversation(uncached) and cached.kv_cache.hits == 2
