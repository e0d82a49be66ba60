"""Instruction conversations: verdicts, locations that agree with the masks, variety, determinism."""

import json

import numpy as np
import pytest
from PIL import Image

from assistant.localize import LOCATION_WORDS, location_words, relative_size
from data_prep.instruct import IMAGE_TOKEN, build_instructions, load_mask, write_instructions
from data_prep.readers import read_llava, read_mvtec
from data_prep.records import ReadResult, Record
from data_prep.synth import SynthPlan, write_dataset


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, SynthPlan(n=24, families=("metal", "cap"), size=64, seed=5, anomaly_ratio=0.6))
    return out


@pytest.fixture(scope="module")
def conversations(synth_dir):
    records, accounting = build_instructions(read_mvtec(synth_dir), synth_dir, seed=0)
    assert accounting.problems == [] and accounting.n_seen == len(records) == 48
    return records


def _answers(record):
    return [turn["value"] for turn in record["conversations"][1::2]]


def test_first_turn_carries_the_image_and_turns_alternate(conversations):
    for record in conversations:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert IMAGE_TOKEN in turns[0]["value"]
        assert sum(t["value"].count(IMAGE_TOKEN) for t in turns) == 1


def test_locations_agree_with_the_masks(conversations, synth_dir):
    anomalous = [r for r in conversations if r["label"] == 1]
    assert len(anomalous) > 20
    for record in anomalous:
        mask = load_mask(synth_dir / record["mask"])
        assert record["location"] == location_words(mask)
        assert record["size"] == relative_size(mask)
        assert record["location"] in _answers(record)[0]
        assert record["defect_type"] in record["image"]


def test_normal_images_are_answered_as_normal(conversations):
    normal = [r for r in conversations if r["label"] == 0]
    assert normal
    for record in normal:
        first = _answers(record)[0].lower()
        assert record["location"] is None and record["mask"] is None
        assert not first.startswith("yes") and not any(word in first for word in LOCATION_WORDS if word != "center")
        assert any(
            word in first for word in ("normal", "no,", "no ", "no.", "passes", "free of defects", "as expected")
        )


def test_anomalous_first_answers_never_deny_the_defect(conversations):
    for record in (r for r in conversations if r["label"] == 1):
        assert not _answers(record)[0].lower().startswith(("no", "normal"))


def test_phrasing_varies_and_follow_ups_cover_severity_and_cause(conversations):
    anomalous = [r for r in conversations if r["label"] == 1]
    firsts = {" ".join(_answers(r)[0].split()[:3]) for r in anomalous}
    assert len(firsts) >= 6
    questions = [t["value"] for r in conversations for t in r["conversations"][2::2]]
    assert any("severe" in q.lower() or "serious" in q.lower() or "reject" in q.lower() for q in questions)
    assert any("cause" in q.lower() or "why" in q.lower() for q in questions)
    assert max(len(r["conversations"]) for r in conversations) >= 6


def test_generic_nouns_name_the_kind_never_the_family(conversations, synth_dir):
    """metal (a texture) and cap (an object): by default the answers name "metal plate"/"bottle cap"; with
    `generic_nouns` they say "surface" and "part" and no family's noun at all (a model trained so never calls an
    unseen surface by a training family's name)."""
    from data_prep.instruct import object_noun

    nouns = (object_noun("metal"), object_noun("cap"))
    texts = lambda records: [" ".join(t["value"] for t in r["conversations"]).lower() for r in records]  # noqa: E731
    assert any(nouns[0] in text for text in texts(conversations)) and any(nouns[1] in t for t in texts(conversations))
    generic, _ = build_instructions(read_mvtec(synth_dir), synth_dir, seed=0, generic_nouns=True)
    assert len(generic) == len(conversations)
    named = {"metal": 0, "cap": 0}
    for record, text in zip(generic, texts(generic)):
        assert not any(noun in text for noun in nouns), text
        family = record["image"].split("/")[0]
        named[family] += ("surface" if family == "metal" else "part") in text
    assert min(named.values()) > 5  # (some conversations name no object at all)


def test_generic_defects_describe_every_type_alike(conversations, synth_dir):
    """By default a defect is described by its type ("a crack", "a stain"); with `generic_defects` every type gets the
    generic kind's words and no type's own, while verdicts and locations stay as they were."""
    from data_prep import phrasebook as pb

    def type_words(kind):
        return [name.lower() for name in pb.KINDS[kind].names + pb.KINDS[kind].looks + pb.KINDS[kind].causes]

    specific = {kind for kind in pb.KINDS if kind != "generic"}
    text = lambda record: " ".join(t["value"] for t in record["conversations"][1::2]).lower()  # noqa: E731
    typed = [r for r in conversations if r.get("defect_type")]
    assert typed and any(any(w in text(r) for k in specific for w in type_words(k)) for r in typed)
    generic, _ = build_instructions(read_mvtec(synth_dir), synth_dir, seed=0, generic_defects=True)
    assert len(generic) == len(conversations)
    described = 0
    for before, after in zip(conversations, generic):
        assert after.get("location") == before.get("location") and after.get("label") == before.get("label")
        answers = text(after)
        for kind in specific:
            assert not any(
                phrase in answers for phrase in (p.lower() for p in pb.KINDS[kind].looks + pb.KINDS[kind].causes)
            ), answers
        described += any(w in answers for w in type_words("generic"))
    assert described > 5


def test_deterministic_from_the_seed(synth_dir):
    source = read_mvtec(synth_dir)
    same_a, _ = build_instructions(source, synth_dir, seed=3)
    same_b, _ = build_instructions(source, synth_dir, seed=3)
    other, _ = build_instructions(source, synth_dir, seed=4)
    assert json.dumps(same_a) == json.dumps(same_b)
    assert json.dumps(same_a) != json.dumps(other)


def test_the_same_data_elsewhere_gives_the_same_conversations(synth_dir, tmp_path):
    """A copy of the data in another folder (another run's output_dir) gets the same conversations, not new draws."""
    import shutil

    copy = tmp_path / "elsewhere" / "synth"
    shutil.copytree(synth_dir, copy)
    here, _ = build_instructions(read_mvtec(synth_dir), synth_dir, seed=3)
    there, _ = build_instructions(read_mvtec(copy), copy, seed=3)
    assert json.dumps(here) == json.dumps(there)


def test_written_file_reads_back_as_llava_and_is_never_overwritten(conversations, synth_dir, tmp_path):
    out = synth_dir / "instruct.json"
    write_instructions(conversations, out)
    with pytest.raises(FileExistsError):
        write_instructions(conversations[:1], out)
    result = read_llava(out)
    assert result.problems == [] and len(result.records) == len(conversations)
    assert {r.label for r in result.records} == {0, 1}
    out.unlink()


def test_mvtec_defect_names_get_matching_descriptions_and_unusable_records_are_reported(tmp_path):
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(image)
    pixels = np.zeros((30, 30), np.uint8)
    pixels[2:8, 22:28] = 255
    Image.fromarray(pixels).save(mask)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "empty.png")
    source = ReadResult()
    source.keep(Record(str(image), 1, str(mask), "screw", "test", "scratch_head"))
    source.keep(Record(str(image), 1, str(tmp_path / "empty.png"), "screw", "test", "thread_top"))
    source.keep(Record(str(image), None, None, "screw", "test"))
    records, accounting = build_instructions(source, tmp_path, seed=0)
    assert len(records) == 1 and records[0]["location"] == "upper right"
    assert "scratch" in _answers(records[0])[0] or "scrape" in _answers(records[0])[0]
    assert {p.reason for p in accounting.dropped} == {"empty mask for an anomalous image", "no normal/anomaly label"}
    assert accounting.n_seen == len(records) + len(accounting.dropped)


def test_the_assistants_default_question_is_taught_and_its_answers_state_the_verdict():
    import random

    from assistant.inference import DEFAULT_QUESTION
    from data_prep import phrasebook as pb
    from eval.default_model_quality import answer_claim

    assert DEFAULT_QUESTION in pb.OPEN_QUESTIONS  # what `ask` puts when no question is given is in the training data
    # every answer an open question can be taught reads as the right verdict to the quality script's classifier
    rng = random.Random(0)
    slots = {
        "noun": "wooden board",
        "where": "upper left",
        "size": "small",
        "normal": "Nothing is wrong.",
        "normal_lower": "nothing is wrong.",
    }
    for template in pb.ANOMALY_PLAIN:
        what = rng.choice(("a scratch", "a stain", "a hole"))
        answer = template.format(**slots, what=what, What=what.capitalize())
        assert answer_claim(answer) == "anomalous", answer
    for template in pb.NORMAL_PLAIN:
        assert answer_claim(template.format(**slots)) == "normal", template
