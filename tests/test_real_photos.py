"""The shipped default model on real photographs that ship inside installed packages (no download).

Photos that are not inspection images (a landscape, a flower, a cat, a portrait) must be flagged out of domain, and
the answer must say so without naming an object from the training families; the location words of any answer are
the report's own. Real photographed surfaces (scikit-image's brick, grass, coins, cell, and gravel and tissue, which
training never saw) are what the model is for.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from assistant.checkpoint import default_model_path
from assistant.inference import NEW_KIND_NOTE
from assistant.localize import LOCATION_WORDS
from eval.default_model_quality import answer_claim

pytestmark = pytest.mark.skipif(not (default_model_path() / "config.json").is_file(), reason="no default model")
skimage_data = pytest.importorskip("skimage.data")

#: nouns the default model's conversations use for its training families: never said of an out-of-domain photo
TRAINING_NOUNS = (
    "wooden board",
    "wood",
    "fabric",
    "metal",
    "pill",
    "cap",
    "brick",
    "lawn",
    "coin",
    "cell culture",
    "foreign particle",
)


def photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_image

    found = {name: Image.fromarray(load_sample_image(f"{name}.jpg")) for name in ("china", "flower")}
    found.update(
        {name: Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in ("astronaut", "chelsea")}
    )
    return found


@pytest.fixture(scope="module")
def assistant():
    from assistant import AnomalyAssistant

    return AnomalyAssistant.from_pretrained("default")


def locations_in(text: str) -> set[str]:
    """The location words a text uses, longest first ("lower center" is not also "center")."""
    text, found = text.lower(), set()
    for words in sorted(LOCATION_WORDS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(words)}\b", text):
            found.add(words)
            text = re.sub(rf"\b{re.escape(words)}\b", " ", text)
    return found


@pytest.mark.parametrize("name", ["china", "flower", "astronaut", "chelsea"])
def test_a_photo_that_is_no_inspection_image_is_flagged_and_the_answer_says_so(assistant, name):
    image = photos()[name]
    for question in (None, "Is this a cat?"):
        report = assistant.analyze(image, question=question, max_new_tokens=48)
        assert report.out_of_domain is True
        assert any("far from everything the model was trained on" in w for w in report.warnings)
        answer = report.answer.lower()
        assert "does not look like the surfaces and parts i was trained to inspect" in answer
        assert f"by its score it is {'anomalous' if report.pred_label else 'normal'}" in answer  # the report's verdict
        assert not [noun for noun in TRAINING_NOUNS if noun in answer], report.answer
        assert locations_in(answer) <= ({report.location} if report.location else set())


def test_real_surfaces_training_saw_are_in_domain_and_answers_use_the_reports_location(assistant):
    from data_prep.synth.photos import make_photo_crop

    rng = np.random.default_rng(5)
    for name in ("brick", "grass", "coins", "cell"):  # the surfaces training saw (new crops)
        crop = Image.fromarray(make_photo_crop(name, 256, rng)[0].astype(np.uint8))
        report = assistant.analyze(crop, max_new_tokens=48)
        assert report.out_of_domain is False
        assert not any("new to the model" in w for w in report.warnings), (name, report.domain_distance)
        assert NEW_KIND_NOTE not in report.answer
        assert locations_in(report.answer) <= ({report.location} if report.location else set()), report.answer


def test_real_surfaces_training_never_saw_are_in_domain_and_the_report_advises_references(assistant):
    """Gravel and tissue photos (never in training) are inspection-like surfaces, not landscapes: the answer comes
    from the model, not the out-of-domain notice. They are a kind of surface training did not show, so a report
    scored on its own advises normal references or a folder (where their false alarms are 1.7-3.3%);
    scored with references, it does not."""
    from data_prep.synth.photos import make_photo_crop

    rng = np.random.default_rng(7)
    for name in ("gravel", "tissue"):
        crops = [Image.fromarray(make_photo_crop(name, 256, rng, scale=0.5)[0].astype(np.uint8)) for _ in range(5)]
        for report in assistant.detect_batch(crops[:3]):
            assert report.out_of_domain is False, (name, report.domain_distance)
            assert any("new to the model" in w and "references" in w for w in report.warnings), report.warnings
        report = assistant.analyze(crops[0], max_new_tokens=48)
        assert "does not look like the surfaces" not in report.answer.lower(), report.answer
        assert any("new to the model" in w for w in report.warnings)
        # the answer says so too, and still claims what the verdict says
        assert report.answer.endswith(NEW_KIND_NOTE) and len(report.answer) > len(NEW_KIND_NOTE)
        assert answer_claim(report.answer) == ("anomalous" if report.pred_label else "normal"), report.answer
        with_references = assistant.analyze(crops[0], references=crops[1:], max_new_tokens=32)
        assert not any("new to the model" in w for w in with_references.warnings)
        assert NEW_KIND_NOTE not in with_references.answer
    assert assistant.detect("examples/pill_contamination.png").warnings == []


def test_the_new_kind_note_ends_a_streamed_answer_and_never_reaches_the_llm(assistant):
    """Streamed, the note comes last, as in the whole answer; in a follow-up the earlier answer reaches the LLM without
    it (the model never wrote it), so the second answer is the one the plain first answer gives."""
    from data_prep.synth.photos import make_photo_crop

    crop = Image.fromarray(make_photo_crop("gravel", 256, np.random.default_rng(7), scale=0.5)[0].astype(np.uint8))
    first = [{"role": "user", "content": "Is there any anomaly in this image?"}]
    whole = assistant.chat(first, crop, stream=False, max_new_tokens=32)
    chunks = list(assistant.chat(first, crop, stream=True, max_new_tokens=32))
    assert "".join(chunks) == whole and chunks[-1] == NEW_KIND_NOTE
    follow = [{"role": "user", "content": "How severe is it?"}]
    seconds = [
        assistant.chat(
            [*first, {"role": "assistant", "content": answer}, *follow], crop, stream=False, max_new_tokens=32
        )
        for answer in (whole, whole.removesuffix(NEW_KIND_NOTE))
    ]
    assert seconds[0] == seconds[1] and seconds[0].endswith(NEW_KIND_NOTE)


def test_references_that_vary_raise_the_threshold_on_a_surface_training_never_saw(assistant):
    """Four normal tissue crops as references: they score high against each other (tissue varies more than any
    held-out normal image the few-shot threshold was fitted on), so the threshold rises to their level and the report
    says so. New normal crops are then passed and a crop with a hole is still caught; references that agree with each
    other (the pill example's) change nothing."""
    from eval.default_model_quality import reference_images, sample_of

    references = reference_images("tissue", 4, seed=1, size=256)
    normals = [Image.fromarray(sample_of("tissue", 2 * i, 11, 256, None).image) for i in range(4)]
    defective = Image.fromarray(sample_of("tissue", 1, 11, 256, "hole").image)
    reports = assistant.detect_batch([*normals, defective], references=references)
    assert [r.pred_label for r in reports] == [False] * 4 + [True]
    assert all(any("normal references score up to" in w for w in r.warnings) for r in reports)
    answer = assistant.analyze(normals[0], references=references, max_new_tokens=32)
    assert answer.pred_label is False and any("normal references score up to" in w for w in answer.warnings)

    pill = assistant.detect("examples/pill_contamination.png", references=["examples/pill_good.png"])
    assert pill.pred_label is True and pill.warnings == []


@pytest.mark.parametrize(("name", "seed"), [("gravel", 12), ("tissue", 11)])
def test_a_folder_of_a_surface_training_never_saw_flags_the_defect_and_fewer_normal_crops(assistant, name, seed):
    """What the new-kind advice promises, on fixed crops of the two surfaces training never saw: scored as a folder
    (each image against the others), the crop with a hole ranks first and is flagged, while at most two of the nine
    normal crops are. Judged at the folder's own threshold (no raise for new kinds), a mostly normal folder of a
    new kind can flag a normal crop that the single-image mode's raised threshold passes; over 60 crops per surface,
    half of them defective, the folder mode's false alarms are 1.7% (docs/default_model.md)."""
    from eval.default_model_quality import sample_of

    normals = [Image.fromarray(sample_of(name, 2 * i, seed, 256, None).image) for i in range(9)]
    folder = [*normals[:4], Image.fromarray(sample_of(name, 1, seed, 256, "hole").image), *normals[4:]]
    reports = assistant.detect_batch(folder, zero_shot="batch")
    assert reports[4].pred_label and max(range(len(reports)), key=lambda i: reports[i].pred_score) == 4
    assert sum(r.pred_label for i, r in enumerate(reports) if i != 4) <= 2
    # all past the new-kind distance: named as such, judged at the folder's own threshold
    notes = [" ".join(r.warnings) for r in reports]
    assert all(("new to the model" in n or "far from everything" in n) and "raised" not in n for n in notes), notes


def test_a_folder_of_a_far_surface_is_not_called_anomalous_throughout(assistant):
    """A folder of fixed crops of a surface far from every training surface (scikit-image's moon photo, kept out of
    training and of every threshold fit): the expert's learned score calls nearly every crop anomalous, and the
    folder mode shifts it back by as much as the folder's typical crop scores above a typical normal training image
    (`Calibration.anchor_folder`). The crop with a hole still ranks first and is flagged, and fewer of the nine
    normal crops are than without the shift (this small folder keeps 5 of them flagged; over 60 crops of moon and
    retina photos the folder mode flags 16.7%, docs/default_model.md)."""
    from assistant.calibration import Calibration
    from eval.default_model_quality import sample_of

    normals = [Image.fromarray(sample_of("moon", 2 * i, 11, 256, None).image) for i in range(9)]
    folder = [*normals[:4], Image.fromarray(sample_of("moon", 1, 11, 256, "hole").image), *normals[4:]]
    config = assistant.model.config
    shipped = Calibration.of(config)
    assert shipped.typical_score_top is not None
    reports = assistant.detect_batch(folder, zero_shot="batch")
    try:
        shipped.replace(typical_score_top=None).write(config)
        unshifted = assistant.detect_batch(folder, zero_shot="batch")
    finally:
        shipped.write(config)
    assert reports[4].pred_label and max(range(len(reports)), key=lambda i: reports[i].pred_score) == 4
    flagged = [sum(r.pred_label for i, r in enumerate(group) if i != 4) for group in (reports, unshifted)]
    assert flagged[0] < flagged[1], flagged


def test_normal_references_of_a_far_surface_shift_the_learned_score_back(assistant):
    """With 4 normal references of the far moon surface, whose own learned scores are high (the expert calls the
    surface anomalous), each image's learned score is shifted back by as much (`Calibration.anchor`) and its learned
    map read relative to theirs: the crop with a hole ranks first and is flagged, and fewer of nine normal crops are
    flagged than without the shift."""
    from assistant.calibration import Calibration
    from eval.default_model_quality import reference_images, sample_of

    normals = [Image.fromarray(sample_of("moon", 2 * i, 14, 256, None).image) for i in range(9)]
    images = [*normals, Image.fromarray(sample_of("moon", 1, 14, 256, "hole").image)]
    references = reference_images("moon", 4, 14, 256)
    config = assistant.model.config
    shipped = Calibration.of(config)
    reports = assistant.detect_batch(images, references=references)
    try:
        shipped.replace(typical_score_top=None).write(config)
        unshifted = assistant.detect_batch(images, references=references)
    finally:
        shipped.write(config)
    assert reports[-1].pred_label and max(range(10), key=lambda i: reports[i].pred_score) == 9  # the hole first
    flagged = [sum(r.pred_label for r in group[:9]) for group in (reports, unshifted)]
    assert flagged[0] < flagged[1], flagged


def test_a_surface_training_never_saw_is_judged_at_the_cautious_threshold_alone(assistant):
    """Scored on its own, an image of a kind of surface training did not show is called anomalous only above the
    top of the held-out thresholds that are as good as the chosen one (`Calibration.for_new_kinds`), and its report
    says so: on fixed gravel, tissue and retina crops, no normal crop is flagged that the plain threshold passes,
    fewer are flagged over the three surfaces (the retina's crops: gravel's and tissue's pass both thresholds since
    the zoom), and every crop with a defect is still caught."""
    from assistant.calibration import Calibration
    from eval.default_model_quality import sample_of

    config = assistant.model.config
    shipped = Calibration.of(config)
    assert shipped.novel_image_threshold > shipped.image_threshold
    flagged = {"cautious": 0, "plain": 0}
    for name, seed in (("gravel", 13), ("tissue", 11), ("retina", 13)):
        normals = [Image.fromarray(sample_of(name, 2 * i, seed, 256, None).image) for i in range(9)]
        defects = [
            Image.fromarray(sample_of(name, 2 * i + 1, seed, 256, defect).image)
            for i, defect in enumerate(("hole", "stain", "foreign_texture", "poisson_patch"))
        ]
        cautious = assistant.detect_batch(normals + defects)
        try:
            shipped.replace(novel_image_threshold=None).write(config)
            plain = assistant.detect_batch(normals + defects)
        finally:
            shipped.write(config)
        assert all(r.pred_label for r in cautious[9:]) and all(r.pred_label for r in plain[9:])
        assert all(p.pred_label or not c.pred_label for c, p in zip(cautious[:9], plain[:9]))
        flagged["cautious"] += sum(r.pred_label for r in cautious[:9])
        flagged["plain"] += sum(r.pred_label for r in plain[:9])
        raised = f"its threshold is raised to {shipped.novel_image_threshold:.2f}"
        if name != "retina":  # most retina crops are out of domain, judged at the top as well
            assert (
                sum(shipped.is_novel(r.domain_distance) for r in cautious[:9]) >= 8
            )  # one tissue crop is out of domain
        assert all(r.domain_distance > shipped.novel_threshold for r in cautious)  # all judged at the top
        assert all(any(raised in w for w in r.warnings) for r in cautious)
        assert not any(any("raised" in w for w in r.warnings) for r in plain)
    assert flagged["cautious"] < flagged["plain"], flagged


def test_inspect_lists_each_report_warning_for_a_folder_of_a_surface_training_never_saw(tmp_path, capsys):
    """`inspect` on a folder of tissue crops (folder mode from 8 images): every report is past the new-kind distance,
    so warnings.txt has a line for each image, and the run ends with a note that points to it."""
    from assistant.cli import main
    from eval.default_model_quality import sample_of

    folder = tmp_path / "tissue"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(sample_of("tissue", 2 * i, 13, 256, None).image).save(folder / f"crop_{i}.png")
    out = tmp_path / "report"
    assert main(["inspect", str(folder), "--out", str(out)]) == 0
    lines = (out / "warnings.txt").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == [f"crop_{i}.png" for i in range(8)]
    assert all(("new to the model" in line or "far from everything" in line) for line in lines)
    err = capsys.readouterr().err
    assert "each against the folder's other images" in err and "8 of 8 reports carry a warning" in err
