"""Model adapters: what answers a task's prompts.

- `ModelAdapter`: any checkpoint `AnomalyAssistant.from_pretrained` loads (this project's, a plain
  LLaVA-OneVision one, a hub id); loaded on first use, so scoring from the cache never loads it.
- `PredictionsAdapter`: answers made elsewhere, read from a file; no model is loaded. Two formats:
  the JSON list of response strings the published VisA-D&R detection script writes (one per entry,
  in the benchmark file's order), or JSONL with one ``{"image": ..., "response": ...}`` per line
  (``response`` may be a list: one answer per question, for the reasoning task), or one
  ``{"image": ..., "question": INDEX, "response": ...}`` per question (MMAD; what an MMAD run writes).

Every adapter answers through the same calls; one that cannot (a predictions file asked for
anomaly maps, a model without an expert asked to ``detect``) raises `AdapterError`.
"""

from __future__ import annotations

import json
from pathlib import Path


class AdapterError(ValueError):
    """The adapter cannot do what the task asks (bad predictions file, no expert, ...)."""


class MissingResponse(AdapterError):
    """A predictions file holds nothing for this sample (a task may record that and go on)."""


class ModelAdapter:
    """A checkpoint, loaded lazily through `AnomalyAssistant.from_pretrained`."""

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 128):
        self.name = model
        self.device = device
        self.max_new_tokens = max_new_tokens
        self._assistant = None
        self._references: tuple[tuple, list] = ((), [])  # the last reference paths and their decoded images

    @property
    def assistant(self):
        if self._assistant is None:
            from assistant.inference import AnomalyAssistant

            self._assistant = AnomalyAssistant.from_pretrained(self.name, device=self.device)
        return self._assistant

    def ask(self, sample, question: str) -> dict:
        """One question: ``{"response", "verdict", "score", "anomaly_map"}`` (verdict/score None without an expert)."""
        report = self.assistant.analyze(sample.image, question, max_new_tokens=self.max_new_tokens)
        return {
            "response": report.answer,
            "verdict": report.pred_label,
            "score": report.pred_score,
            "anomaly_map": report.anomaly_map,
        }

    @property
    def has_expert(self) -> bool:
        """Whether references reach the model (its anomaly expert) and answers carry a verdict."""
        return self.assistant.has_expert

    def ask_each(self, sample, prompts: list[str]) -> list[dict]:
        """Each prompt asked on its own (no history), the sample's references given to the expert; as `ask`."""
        answers = []
        for prompt in prompts:
            report = self.assistant.analyze(
                sample.image, prompt, references=sample.extra.get("references"), max_new_tokens=self.max_new_tokens
            )
            answers.append(
                {
                    "response": report.answer,
                    "verdict": report.pred_label,
                    "score": report.pred_score,
                    "anomaly_map": report.anomaly_map,
                }
            )
        return answers

    def converse(self, sample, questions: list[str]) -> list[str]:
        """Each question asked with the earlier questions and the model's own answers as history."""
        messages: list[dict] = []
        answers = []
        for question in questions:
            messages.append({"role": "user", "content": question})
            answer = self.assistant.chat(
                messages, sample.image, stream=False, max_new_tokens=self.max_new_tokens
            ).strip()
            messages.append({"role": "assistant", "content": answer})
            answers.append(answer)
        return answers

    def detect(self, sample) -> dict:
        """The detection-only path: ``{"score", "verdict", "anomaly_map"}``, no text."""
        try:
            report = self.assistant.detect(sample.image, references=self._reference_images(sample))
        except ValueError as error:
            if self.assistant.has_expert:
                raise
            raise AdapterError(str(error)) from error
        return {"score": report.pred_score, "verdict": report.pred_label, "anomaly_map": report.anomaly_map}

    def _reference_images(self, sample) -> list | None:
        """The sample's normal references, decoded once for every sample of a class that shares them (`--shots K`)."""
        paths = tuple(sample.extra.get("references") or ())
        if not paths:
            return None
        if self._references[0] != paths:
            from assistant.imageio import load_image

            self._references = (paths, [load_image(path) for path in paths])
        return self._references[1]

    def detect_folder(self, samples) -> list[dict]:
        """The folder mode: the samples' images scored against each other (`AnomalyAssistant.detect_batch`)."""
        if len(samples) < 2:
            return [self.detect(sample) for sample in samples]
        reports = self.assistant.detect_batch([s.image for s in samples], zero_shot="batch")
        return [{"score": r.pred_score, "verdict": r.pred_label, "anomaly_map": r.anomaly_map} for r in reports]


class PredictionsAdapter:
    """Responses from a file, looked up by the sample's position or its benchmark image path."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = f"predictions:{self.path.name}"
        self._by_index, self._by_image = _read_predictions_file(self.path)

    def _response(self, sample):
        if self._by_index is not None:
            if sample.index >= len(self._by_index):
                raise AdapterError(
                    f"'{self.path}' holds {len(self._by_index)} responses; none for entry {sample.index} ({sample.key})"
                )
            return self._by_index[sample.index]
        for key in (sample.key, sample.image):
            if key in self._by_image:
                return self._by_image[key]
        raise MissingResponse(f"'{self.path}' has no response for image '{sample.key}'")

    def check_count(self, n_entries: int) -> None:
        """A JSON list must hold exactly one response per benchmark entry."""
        if self._by_index is not None and len(self._by_index) != n_entries:
            raise AdapterError(f"'{self.path}' holds {len(self._by_index)} responses for {n_entries} benchmark entries")

    def ask(self, sample, question: str) -> dict:
        response = self._response(sample)
        if not isinstance(response, str):
            raise AdapterError(f"'{self.path}': the response for '{sample.key}' must be a string")
        return {"response": response, "verdict": None, "score": None, "anomaly_map": None}

    has_expert = False  # a file holds answers only: no verdict, no reference reaches a model

    def ask_each(self, sample, prompts: list[str]) -> list[dict]:
        """The answers to the sample's questions (``sample.extra["questions"]``, each with its benchmark ``index``)."""
        response = self._response(sample)
        numbers = [q["index"] for q in sample.extra["questions"]]
        if isinstance(response, list):
            response = dict(enumerate(response))
        if not isinstance(response, dict):
            raise AdapterError(f"'{self.path}': '{sample.key}' needs one response per question (\"question\": INDEX)")
        answers = []
        for number in numbers:
            if not isinstance(response.get(number), str):
                raise AdapterError(f"'{self.path}' has no response for question {number} of '{sample.key}'")
            answers.append({"response": response[number], "verdict": None, "score": None, "anomaly_map": None})
        return answers

    def converse(self, sample, questions: list[str]) -> list[str]:
        response = self._response(sample)
        answers = [response] if isinstance(response, str) else response
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise AdapterError(f"'{self.path}': the responses for '{sample.key}' must be a string or a list of strings")
        if len(answers) != len(questions):
            raise AdapterError(
                f"'{self.path}': {len(answers)} responses for the {len(questions)} questions of '{sample.key}'"
            )
        return answers

    def detect(self, sample) -> dict:
        raise AdapterError("a predictions file holds no anomaly scores or maps; the ad task needs --model")


def _read_predictions_file(path: Path) -> tuple[list | None, dict | None]:
    """(responses by position, None) for a JSON list, (None, responses by image) for JSONL."""
    if not path.is_file():
        raise AdapterError(f"predictions file '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterError(f"cannot read predictions file '{path}' ({error})") from error
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise AdapterError(f"'{path}': bad JSON ({error.msg} at line {error.lineno})") from error
        if not all(isinstance(item, (str, list)) for item in data):
            raise AdapterError(f"'{path}': a JSON predictions file must be a list of response strings")
        return data, None
    by_image: dict = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise AdapterError(f"'{path}' line {number}: bad JSON ({error.msg})") from error
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or "response" not in obj:
            raise AdapterError(f'\'{path}\' line {number}: expected {{"image": ..., "response": ...}}')
        if "question" in obj:  # one line per question: gathered by image, keyed by question index
            question = obj["question"]
            if not isinstance(question, int) or isinstance(question, bool) or question < 0:
                raise AdapterError(f"'{path}' line {number}: \"question\" must be a question index (0, 1, ...)")
            answers = by_image.setdefault(obj["image"], {})
            if not isinstance(answers, dict) or question in answers:
                image = obj["image"]
                raise AdapterError(f"'{path}' line {number}: a second response for question {question} of '{image}'")
            answers[question] = obj["response"]
            continue
        if obj["image"] in by_image:
            raise AdapterError(f"'{path}' line {number}: a second response for '{obj['image']}'")
        by_image[obj["image"]] = obj["response"]
    if not by_image:
        raise AdapterError(f"predictions file '{path}' is empty")
    return None, by_image
