"""Reasoning scores (ROUGE-L, embeddings, LLM judge) and VisA-D&R detection scoring."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from eval.detection import image_class, score_detection, text_says_yes
from eval.text_metrics import (
    JUDGE_SYSTEM_PROMPT,
    EmbeddingSimilarity,
    LLMJudge,
    build_judge_messages,
    parse_judge_score,
    rouge_l,
    rouge_l_scores,
)

# ---------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------


def test_rouge_l_known_values():
    # LCS("the cat was found under the bed", "the cat was under the bed") = 6 tokens (the whole
    # reference); P = 6/7, R = 6/6, F = 2 * 6/7 / (6/7 + 1) = 12/13
    assert rouge_l("the cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)
    # reversed order: LCS is a single token, P = R = 1/4
    assert rouge_l("crack scratch dent hole", "hole dent scratch crack") == pytest.approx(0.25)
    assert rouge_l("a crack on the rim", "missing wire") == 0.0
    # case and punctuation are ignored; stemming ("cracks" -> "crack") is on by default
    assert rouge_l("Cracks!", "crack") == pytest.approx(1.0)
    assert rouge_l("cracks", "crack", use_stemmer=False) == 0.0


def test_rouge_l_scores_pairs_in_order_and_checks_lengths():
    scores = rouge_l_scores(["a red stain", "no defect"], ["no defect", "no defect"])
    assert scores == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="length mismatch"):
        rouge_l_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="not one string"):
        rouge_l_scores("abc", "abc")


# ---------------------------------------------------------------------------------------------
# embedding similarity
# ---------------------------------------------------------------------------------------------


def test_text_metrics_import_does_not_load_sentence_transformers():
    code = "import sys, eval.text_metrics; print('sentence_transformers' in sys.modules, 'openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_embedding_similarity_offline_paraphrase_beats_unrelated(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    similarity = EmbeddingSimilarity()
    assert similarity._model is None  # nothing loaded before the first call
    scores = similarity(
        [
            "There is a crack on the left edge of the bottle.",
            "There is a crack on the left edge of the bottle.",
            "The capsule has a scratch near its top.",
        ],
        [
            "The bottle's left rim is fractured.",  # paraphrase
            "The weather in Lisbon was sunny yesterday.",  # unrelated
            "The capsule has a scratch near its top.",  # identical
        ],
    )
    assert scores.shape == (3,)
    assert scores[0] > scores[1] + 0.3
    assert scores[2] == pytest.approx(1.0, abs=1e-5)
    model = similarity.model
    assert similarity.score("a dent", "a dent") == pytest.approx(1.0, abs=1e-5)
    assert similarity.model is model  # loaded once per object
    assert similarity([], []).shape == (0,)


# ---------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Score: 7\nThe defect type is right but the location is wrong.", 7.0),
        ("**Score**: 8/10 - close to the reference.", 8.0),
        ('{"score": 9, "reason": "matches"}', 9.0),
        ('```json\n{"Score": "6"}\n```', 6.0),
        ("I would rate it 7 out of 10.", 7.0),
        ("The score is 8.5.", 8.5),
        ("  6  ", 6.0),
        ("On a score from 1 to 10 this deserves... Score: 4", 4.0),
        ("Score: 11", None),
        ("Score: 0", None),
        ('{"score": true}', None),
        ("I cannot judge this.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_score(reply, expected):
    assert parse_judge_score(reply) == expected


def test_judge_prompt_snapshot():
    messages = build_judge_messages("  Is there an anomaly?", "Yes, a crack at the top.", "No anomaly.\n")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == JUDGE_SYSTEM_PROMPT
    assert "'Score: N'" in JUDGE_SYSTEM_PROMPT and "1 (wrong or irrelevant) to 10" in JUDGE_SYSTEM_PROMPT
    assert messages[1]["content"] == (
        "Question:\nIs there an anomaly?\n\n"
        "Reference answer:\nYes, a crack at the top.\n\n"
        "Candidate answer:\nNo anomaly.\n\n"
        "Score the candidate answer."
    )


class FakeClient:
    """Stands in for openai.OpenAI: records the request, answers with a canned reply."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        self.requests.append(kwargs)
        message = SimpleNamespace(content=self.reply)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def test_llm_judge_with_fake_client():
    client = FakeClient("Score: 3\nIt misses the anomaly.")
    judge = LLMJudge(model="qwen-judge", client=client, temperature=0.0, max_tokens=64)
    result = judge.judge("Is there an anomaly?", "Yes, a crack.", "No.")
    assert result == {"score": 3.0, "raw": "Score: 3\nIt misses the anomaly."}
    (request,) = client.requests
    assert request["model"] == "qwen-judge"
    assert request["temperature"] == 0.0 and request["max_tokens"] == 64
    assert request["messages"] == build_judge_messages("Is there an anomaly?", "Yes, a crack.", "No.")
    client.reply = None  # some servers return no content
    assert judge.score("q", "r", "p") is None


def test_llm_judge_builds_no_client_until_used_and_names_the_missing_key(monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    judge = LLMJudge(model="m", base_url="http://localhost:9/v1", api_key_env="MY_JUDGE_KEY")
    assert judge._client is None
    with pytest.raises(ValueError, match=r"\$MY_JUDGE_KEY"):
        judge.score("q", "r", "p")


# ---------------------------------------------------------------------------------------------
# VisA-D&R detection
# ---------------------------------------------------------------------------------------------

RECORDS = [
    # candle: verdict T F F T, text T F F F, truth T T F F
    ("VisA/candle/Data/Images/Anomaly/000.JPG", True, True, "Yes, there is a crack in the wax."),
    ("VisA/candle/Data/Images/Anomaly/001.JPG", True, False, "No anomaly is visible."),
    ("VisA/candle/Data/Images/Normal/000.JPG", False, False, "No, the candle looks normal."),
    ("VisA/candle/Data/Images/Normal/001.JPG", False, True, "No. The wick is fine."),
    # pcb1: verdict T None F F, text T T T F, truth T T F F
    ("VisA/pcb1/Data/Images/Anomaly/000.JPG", True, True, "yes. A bent pin."),
    ("VisA/pcb1/Data/Images/Anomaly/001.JPG", True, None, "Yes, a part is missing."),
    ("VisA/pcb1/Data/Images/Normal/000.JPG", False, False, "Its two LEDs look like eyes; it is normal."),
    ("VisA/pcb1/Data/Images/Normal/001.JPG", False, False, "NO."),
]


def test_text_rule_is_the_published_substring_rule():
    assert text_says_yes("Yes.") and text_says_yes("I'd say yes") and text_says_yes("two eyes")
    assert not text_says_yes("YES") and not text_says_yes("No, it is fine.")


def test_image_class_is_the_second_path_component():
    assert image_class("VisA/pcb1/Data/Images/Anomaly/000.JPG") == "pcb1"
    assert image_class("VisA\\macaroni2\\Data\\x.JPG") == "macaroni2"
    with pytest.raises(ValueError, match="not of the form"):
        image_class("candle.JPG")


def test_score_detection_hand_computed():
    summary, rows = score_detection(RECORDS)
    assert [r["class"] for r in rows] == ["candle", "pcb1"]
    candle, pcb1 = rows
    # candle verdict: TP 1, FN 1, TN 1, FP 1 -> accuracy P R F1 all 1/2
    assert [candle[f"verdict_{m}"] for m in ("accuracy", "precision", "recall", "f1")] == pytest.approx(
        [0.5, 0.5, 0.5, 0.5]
    )
    # candle text: TP 1, FN 1, TN 2, FP 0 -> acc 3/4, P 1, R 1/2, F1 2/3
    assert [candle[f"text_{m}"] for m in ("accuracy", "precision", "recall", "f1")] == pytest.approx(
        [0.75, 1.0, 0.5, 2 / 3]
    )
    # only record 4 disagrees (verdict T, text F)
    assert candle["disagreement_rate"] == pytest.approx(1 / 4)
    assert candle["n"] == 4 and candle["n_anomalous"] == 2 and candle["verdict_missing"] == 0
    # pcb1 verdict: the missing verdict on an anomalous image counts as a miss
    # TP 1, FN 1, TN 2 -> acc 3/4, P 1, R 1/2, F1 2/3
    assert [pcb1[f"verdict_{m}"] for m in ("accuracy", "precision", "recall", "f1")] == pytest.approx(
        [0.75, 1.0, 0.5, 2 / 3]
    )
    # pcb1 text ("eyes" is a yes): TP 2, FP 1, TN 1 -> acc 3/4, P 2/3, R 1, F1 4/5
    assert [pcb1[f"text_{m}"] for m in ("accuracy", "precision", "recall", "f1")] == pytest.approx(
        [0.75, 2 / 3, 1.0, 0.8]
    )
    # 3 records with a verdict, the "eyes" one disagrees
    assert pcb1["disagreement_rate"] == pytest.approx(1 / 3)
    assert pcb1["verdict_missing"] == 1

    assert summary["n"] == 8 and summary["n_classes"] == 2 and summary["verdict_missing"] == 1
    assert summary["verdict_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
    assert summary["verdict_precision"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["verdict_recall"] == pytest.approx(0.5)
    assert summary["verdict_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert summary["text_accuracy"] == pytest.approx(0.75)
    assert summary["text_precision"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert summary["text_recall"] == pytest.approx(0.75)
    assert summary["text_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert summary["disagreement_rate"] == pytest.approx(2 / 7)  # over the 7 records with a verdict


def test_score_detection_accepts_mappings_and_rows_are_flat():
    as_dicts = [dict(zip(("image_path", "truth", "verdict", "response_text"), r)) for r in RECORDS]
    summary, rows = score_detection(as_dicts)
    assert summary == score_detection(RECORDS)[0]
    assert all(isinstance(v, (str, int, float)) for row in rows for v in row.values())


def test_score_detection_edge_cases_and_errors():
    # a class with no predicted positives has precision 0, not an error; all-missing verdicts give NaN disagreement
    summary, rows = score_detection([("VisA/fryum/a.JPG", True, None, "No."), ("VisA/fryum/b.JPG", False, None, "No.")])
    assert rows[0]["text_precision"] == 0.0 and rows[0]["text_accuracy"] == 0.5
    assert rows[0]["verdict_accuracy"] == 0.0  # missing verdicts are always wrong
    assert math.isnan(summary["disagreement_rate"])
    with pytest.raises(ValueError, match="no detection records"):
        score_detection([])
    with pytest.raises(ValueError, match="record 0 lacks key 'verdict'"):
        score_detection([{"image": "VisA/a/b.JPG", "truth": True, "response": "yes"}])
    with pytest.raises(ValueError, match="record 1: verdict must be a bool or None"):
        score_detection([RECORDS[0], ("VisA/a/b.JPG", True, "yes", "yes")])
