"""`AnomalyAssistant`: the one object behind the CLI, the app, the server and evaluation.

The verdict comes from the expert's calibrated score (never from the text); the LLM is told the
suspicion level through the marker in front of the look-twice tokens and explains it.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, TextIteratorStreamer

from . import checkpoint
from .imageio import load_image
from .jsonutil import answer_record
from .limits import DEFAULT_QUESTION, MAX_QUESTION_CHARS
from .localize import boxes_from_mask, location_words
from .maps import image_anomaly_map
from .modeling import VisualEncoding, output_cache
from .processing import as_chat, where_text
from .sessions import KVCacheStore

#: how images are scored without normal references: each on its own, or each against the other images given with it
ZERO_SHOT_MODES = ("single", "batch")
#: a folder of at least this many images is scored in the batch mode by default (`anomaly-assistant inspect`)
BATCH_MODE_MIN_IMAGES = 8


@dataclass
class AnomalyReport:
    """What the assistant found, with anomalib's field names."""

    answer: str
    pred_score: float | None
    pred_label: bool | None
    anomaly_map: np.ndarray | None  # float32 [H, W] at the input size, probability of anomaly
    pred_mask: np.ndarray | None  # bool [H, W]; empty when the verdict is normal
    boxes: list[dict] = field(default_factory=list)  # [{"box": [x0, y0, x1, y1], "score": s}], input pixels
    location: str = ""
    threshold: float | None = None
    #: the image is far from everything the model was trained on (`assistant.domain`); None: the model has no check
    out_of_domain: bool | None = None
    domain_distance: float | None = None
    model: str = ""
    image: Image.Image | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)  # e.g. a reference that looks like another kind of part

    def evidence(self) -> dict:
        """The verdict and its evidence as JSON values: the one serialiser of the CLI, the app and the server."""
        return {
            "anomalous": self.pred_label,
            "score": None if self.pred_score is None else round(float(self.pred_score), 6),
            "threshold": None if self.threshold is None else round(float(self.threshold), 6),
            "boxes": self.boxes,
            "location": self.location or None,
            "out_of_domain": self.out_of_domain,
            "model": self.model,
            "warnings": list(self.warnings),
        }

    def to_dict(self, heatmap: str | None = None) -> dict:
        """The answer and the evidence; `heatmap` is where the overlay was written, if it was."""
        return answer_record(self.answer, self.evidence(), heatmap)


#: a reference whose colour histogram shares less than this with the query's is another kind of part
REFERENCE_MIN_COLOUR_OVERLAP = 0.25
#: ... or whose width or height differs from the query's by more than this factor
REFERENCE_SIZE_RATIO = 2.0


def _colour_histogram(image: Image.Image, levels: int = 4) -> np.ndarray:
    """The share of pixels in each of `levels`³ RGB bins (on a 64×64 thumbnail)."""
    pixels = np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.int64) // (256 // levels)
    bins = (pixels[..., 0] * levels + pixels[..., 1]) * levels + pixels[..., 2]
    return np.bincount(bins.ravel(), minlength=levels**3) / bins.size


def floor_warning(floor: float | None, threshold: float) -> list[str]:
    """The note a report carries when its normal references raised the verdict threshold (`Calibration.raise_to`)."""
    if floor is None or floor <= threshold:
        return []
    return [
        f"the normal references score up to {floor:.2f} against each other (threshold {threshold:.2f}): only images "
        f"scoring above them are called anomalous, and the score is given on that scale"
    ]


def novelty_warning(calibration, distance, mode: str = "single") -> list[str]:
    """The note a report scored without references carries when the image lies past the new-kind distance: in domain
    but of a kind training did not show (`Calibration.is_novel`), or out of domain altogether. Scored on its own
    ("single"), its threshold is then the cautious one (`Calibration.for_new_kinds`) and the note also advises
    references or a folder, the modes whose verdicts carry over to new surfaces; in a folder ("batch") the note only
    names the new kind."""
    if not calibration.is_past_new_kind(distance):
        return []
    top, threshold = calibration.novel_image_threshold, calibration.image_threshold
    raised = (
        f"; its threshold is raised to {top:.2f} (the score is given on the {threshold:.2f} scale)"
        if mode == "single" and top is not None and top > threshold
        else ""
    )
    if calibration.is_out_of_domain(distance):
        return [
            f"this image is far from everything the model was trained on (distance {float(distance):.2f}; out of "
            f"domain past {calibration.domain_threshold:.2f}): its verdict is unreliable{raised}"
        ]
    new_kind = (
        f"this kind of surface is new to the model (distance {float(distance):.2f} to its training images; seen kinds "
        f"stay under {calibration.novel_threshold:.2f})"
    )
    if mode == "batch":
        return [new_kind + raised]
    return [
        f"{new_kind}: single-image verdicts are least reliable here{raised}; give 4-8 images of good parts as normal "
        f"references (2 are too few here), or score a folder of such images together"
    ]


def report_warnings(
    image: Image.Image, references, calibration, floor: float | None, distance, histograms=None
) -> list[str]:
    """Every warning a report carries, the one place that decides them: with normal references, those that do not
    look like the part and a raised threshold (`floor_warning`); without, a kind of surface new to the model
    (`novelty_warning`)."""
    if references:
        return reference_warnings(image, references, histograms) + floor_warning(floor, calibration.image_threshold)
    return novelty_warning(calibration, distance)


def reference_warnings(image: Image.Image, references, histograms: list[np.ndarray] | None = None) -> list[str]:
    """Warnings for normal references that do not look like the inspected part, or that are the inspected image.

    The rule (kept simple on purpose): a reference is flagged when its coarse colour histogram (4 levels
    per channel) overlaps the query's by less than `REFERENCE_MIN_COLOUR_OVERLAP` (histogram
    intersection, 1 = same colours), or its width or height is more than `REFERENCE_SIZE_RATIO` times
    the query's or less than its inverse. The score is still computed against it. `histograms`: the
    references' own (`_colour_histogram`), when computed once for many images. A reference with the image's own
    pixels (`inspect DIR --reference DIR`, say) matches it everywhere, so the image scores as normal whatever it
    shows: that is said too (the histograms pick the candidates, so a folder costs no pixel comparison per pair).
    """
    query = _colour_histogram(image)
    if histograms is None:
        histograms = [_colour_histogram(reference) for reference in references]
    found = []
    for number, (reference, histogram) in enumerate(zip(references, histograms), start=1):
        if _same_pixels(reference, image, histogram, query):
            found.append(
                f"reference {number} is this image itself: an image matches itself everywhere, so it scores as "
                "normal whatever it shows; leave it out of the references"
            )
            continue
        overlap = float(np.minimum(histogram, query).sum())
        ratio = max(
            max(reference.width, image.width) / min(reference.width, image.width),
            max(reference.height, image.height) / min(reference.height, image.height),
        )
        why = []
        if overlap < REFERENCE_MIN_COLOUR_OVERLAP:
            why.append(f"its colours overlap the image's by {overlap:.0%} (under {REFERENCE_MIN_COLOUR_OVERLAP:.0%})")
        if ratio > REFERENCE_SIZE_RATIO:
            size = f"{reference.width}×{reference.height}"
            why.append(f"its size {size} is far from the image's {image.width}×{image.height}")
        if why:
            found.append(
                f"reference {number} may show another kind of part: {' and '.join(why)}; the score compares against it"
            )
    return found


def _same_pixels(reference: Image.Image, image: Image.Image, reference_histogram, histogram) -> bool:
    """Whether two images have the same size and RGB pixels; the colour histograms rule most pairs out first."""
    if reference.size != image.size or not np.array_equal(reference_histogram, histogram):
        return False
    return reference.convert("RGB").tobytes() == image.convert("RGB").tobytes()


#: what an answer about an image of a kind of surface new to the model ends with, scored on its own
#: (`Calibration.is_novel`): the report's warning in the answer's words, for a reader of the answer alone (the OpenAI-
#: style server's clients); it claims neither a defect nor a normal part (`eval.default_model_quality.answer_claim`)
NEW_KIND_NOTE = (
    " This kind of surface is new to me, so one image alone is where my verdicts are least reliable: a few images "
    "of good parts of the same kind, given as references, would settle it."
)


def out_of_domain_answer(evidence: dict) -> str:
    """What the assistant says about an image far from everything it was trained on: that it cannot judge it
    reliably, then what the score says (verdict, score, threshold, where the map peaks, in the report's own words)
    for a user who knows the image is an inspection image; no object and no kind of defect is named."""
    where = f" The map is highest in the {evidence['location']}." if evidence.get("location") else ""
    verdict, side = ("anomalous", "above") if evidence["pred_label"] else ("normal", "below")
    return (
        f"This image does not look like the surfaces and parts I was trained to inspect, so I cannot judge it "
        f"reliably. By its score it is {verdict}: {evidence['pred_score']:.2f}, {side} the threshold of "
        f"{evidence['threshold']:.2f}.{where} Please check it yourself, or give me a few normal images of the same "
        f"kind as references."
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise checkpoint.ModelLoadError("--device cuda was asked for but no CUDA device is available")
    return device


class AnomalyAssistant:
    def __init__(
        self,
        model,
        processor,
        generation_config: GenerationConfig,
        name: str,
        kind: str,
        cache_size: int = 4,
        kv_cache_bytes: int = 1 << 30,
        kv_cache_entries: int = 64,
    ):
        self.model = model
        self.processor = processor
        self.generation_config = generation_config
        self.name = name
        self.kind = kind
        self._cache: OrderedDict[str, tuple[VisualEncoding, dict]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        #: the references' leave-one-out floor, typical scores and memory bank (`AnomalyAssistantModel.reference_set`)
        #: per set of references
        self._reference_sets: OrderedDict[str, tuple] = OrderedDict()
        #: conversation KV caches reused across chat turns (0 bytes turns reuse off)
        self.kv_cache = KVCacheStore(max_bytes=kv_cache_bytes, max_entries=kv_cache_entries)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str = "default",
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        expert: str | None = None,
        **options,
    ) -> AnomalyAssistant:
        """Load a checkpoint ("default", a folder or a hub id); `expert` adds Anomaly-OV's expert weights.

        `options`: `cache_size` (encoded images kept), `kv_cache_bytes` and `kv_cache_entries` (conversation
        caches kept between chat turns).
        """
        device = _resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, processor, generation, kind = checkpoint.load(path_or_id, dtype=dtype, device=device)
        if expert is not None:
            checkpoint.attach_anomaly_ov_expert(model, expert)
            model.to(device)
            kind = "assistant"
        return cls(model, processor, generation, str(path_or_id), kind, **options)

    @property
    def has_expert(self) -> bool:
        return self.model.expert is not None

    # -- vision -----------------------------------------------------------------------------------
    @staticmethod
    def _key(*images: Image.Image) -> str:
        """A digest of the images' sizes and pixels (the caches' keys)."""
        digest = hashlib.sha1()
        for im in images:
            digest.update(f"{im.size}".encode())
            digest.update(im.tobytes())
        return digest.hexdigest()

    def _reference_set(self, references: list[Image.Image], refs: dict | None = None):
        """The references' floor for the verdict threshold, typical scores and memory bank
        (`AnomalyAssistantModel.reference_set`), computed once per set of references (a few sets kept); `refs`, their
        preprocessed pixels, are made here when not given and the set is not cached."""
        key = self._key(*references)
        with self._lock:
            if key in self._reference_sets:
                self._reference_sets.move_to_end(key)
                return self._reference_sets[key]
        refs = refs if refs is not None else self.processor.preprocess(references)
        with torch.no_grad():
            found = self.model.reference_set(refs["pixel_values"], refs["image_sizes"], refs.get("zoom_pixel_values"))
        with self._lock:
            self._reference_sets[key] = found
            while len(self._reference_sets) > 8:
                self._reference_sets.popitem(last=False)
        return found

    @torch.no_grad()
    def encode(self, image, references=None) -> tuple[Image.Image, VisualEncoding, dict]:
        """Load and encode the image (and normal references) once; reused across chat turns."""
        image = load_image(image)
        references = [load_image(r) for r in references or []]
        key = self._key(image, *references)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                visual, pixels = self._cache[key]
                return image, visual, pixels
        pixels = self.processor.preprocess([image])
        shown = references[: getattr(self.model.config, "references_as_images", 0)]  # references the LLM sees as images
        # the references' pixels only where the LLM sees them; the expert reads the set's cached bank and statistics
        # (`_reference_set`), so a further image asked about with the same references does not preprocess them again
        refs = self.processor.preprocess(references) if references and shown else None
        floor, typical, bank = self._reference_set(references, refs) if references and self.has_expert else (None,) * 3
        visual = self.model.encode_images(
            pixels["pixel_values"],
            pixels["image_sizes"],
            refs["pixel_values"] if refs else None,
            refs["image_sizes"] if refs else None,
            reference_typical=typical,
            reference_bank=bank,
            zoom_pixel_values=pixels.get("zoom_pixel_values"),
        )
        calibration = self.model.config.calibration
        if references and visual.scores is not None:  # the references' own spread raises the verdict threshold
            visual.scores = calibration.raise_to(visual.scores, floor)
            visual.extras["reference_floor"] = floor
        elif visual.scores is not None:  # a kind of surface training did not show takes the cautious threshold
            visual.scores = calibration.for_new_kinds(visual.scores, visual.domain_distances)
        with self._lock:
            visual.extras["key"] = key
            visual.extras["reference_images"] = shown[: visual.extras.get("references_shown", 0)]
            self._cache[key] = (visual, pixels)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return image, visual, pixels

    def _evidence(self, image: Image.Image, visual: VisualEncoding) -> dict:
        """Score, verdict, map, mask, boxes and location; computed once per encoded image, copied per report."""
        if "evidence" not in visual.extras:
            visual.extras["evidence"] = self._compute_evidence(image, visual)
        return copy.deepcopy(visual.extras["evidence"])

    def _compute_evidence(self, image: Image.Image, visual: VisualEncoding) -> dict:
        if visual.scores is None:
            return {
                "pred_score": None,
                "pred_label": None,
                "anomaly_map": None,
                "pred_mask": None,
                "boxes": [],
                "location": "",
                "threshold": None,
                "out_of_domain": None,
                "domain_distance": None,
            }
        config = self.model.config
        calibration = config.calibration
        score = float(visual.scores[0])
        distance = float(visual.domain_distances[0]) if visual.domain_distances is not None else None
        label = calibration.is_anomalous(score)
        amap = (
            image_anomaly_map(visual.crop_maps[0], (image.height, image.width), *self.model.crop_layout())
            .cpu()
            .numpy()
            .astype(np.float32)
        )
        mask = (amap >= calibration.pixel_threshold) if label else np.zeros(amap.shape, dtype=bool)
        if label and not mask.any():  # anomalous but no pixel passes: mark the peak region
            mask = amap >= amap.max() * 0.9
        boxes = boxes_from_mask(mask, amap, min_area=max(1, int(0.0005 * mask.size))) if label else []
        if label and not boxes:  # only specks pass: an anomalous verdict still says where its peak is
            boxes = boxes_from_mask(mask, amap)[:1]
        # the top region's centre of mass, placed as a ground-truth mask is (a box's middle strays for irregular regions)
        location = location_words(boxes[0]["center"], image.width, image.height) if boxes else ""
        return {
            "pred_score": score,
            "pred_label": bool(label),
            "anomaly_map": amap,
            "pred_mask": mask,
            "boxes": boxes,
            "location": location,
            "threshold": calibration.image_threshold,
            "out_of_domain": calibration.is_out_of_domain(distance),
            "domain_distance": distance,
        }

    def detect(self, image, references=None) -> AnomalyReport:
        """The detection-only path: score, map, mask, boxes and location, no text generated."""
        return self.detect_batch([image], references, batch_size=1)[0]

    def detect_batch(
        self, images, references=None, batch_size: int = 8, zero_shot: str = "single"
    ) -> list[AnomalyReport]:
        """The detection path over many images, `batch_size` at a time through the tower and the expert.

        `images` are sources `load_image` accepts (load them yourself first to handle unreadable files
        one by one). With `zero_shot="single"` (or with references) the reports equal `detect` on each image;
        with `zero_shot="batch"` and no references each image is scored against the others
        (`AnomalyAssistantModel.detect_folder`, at least 2 images).
        """
        if zero_shot not in ZERO_SHOT_MODES:
            raise ValueError(f"zero_shot must be one of {ZERO_SHOT_MODES}, got {zero_shot!r}")
        if not self.has_expert:
            raise ValueError(f"the model '{self.name}' has no anomaly expert, so it cannot score images")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        loaded = [load_image(im) for im in images]
        references = [load_image(r) for r in references or []]
        if zero_shot == "batch" and not references:
            return self._detect_folder(loaded, batch_size)
        calibration = self.model.config.calibration
        # the references are read once per set (`_reference_set`): each batch needs only their bank and statistics
        floor, typical, bank = self._reference_set(references) if references else (None,) * 3
        histograms = [_colour_histogram(reference) for reference in references]  # once for every image
        reports = []
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start : start + batch_size]
            pixels = self.processor.preprocess(chunk)
            with torch.no_grad():
                crop_maps, scores, distances = self.model.detect(
                    pixels["pixel_values"],
                    pixels["image_sizes"],
                    with_domain=True,
                    reference_bank=bank,
                    reference_typical=typical,
                    zoom_pixel_values=pixels.get("zoom_pixel_values"),
                )
            scores = calibration.raise_to(scores, floor) if references else calibration.for_new_kinds(scores, distances)
            far = distances.tolist() if distances is not None else [None] * len(chunk)
            warnings = [
                report_warnings(image, references, calibration, floor, d, histograms) for image, d in zip(chunk, far)
            ]
            reports.extend(self._reports(chunk, crop_maps, scores, distances, warnings))
        return reports

    def _reports(self, images, crop_maps, scores, distances, warnings=None) -> list[AnomalyReport]:
        reports = []
        for i, image in enumerate(images):
            visual = VisualEncoding(
                image_embeds=[],
                image_sizes=[(image.height, image.width)],
                crop_maps=[crop_maps[i]],
                scores=scores[i : i + 1],
                domain_distances=distances[i : i + 1] if distances is not None else None,
            )
            found = warnings[i] if warnings is not None else []
            reports.append(
                AnomalyReport(answer="", model=self.name, image=image, warnings=found, **self._evidence(image, visual))
            )
        return reports

    def _detect_folder(self, images, batch_size: int) -> list[AnomalyReport]:
        """Folder zero-shot: every image's patches against the other images' (one preprocessing pass, one scoring). The
        images are preprocessed chunk by chunk as the tower reads them, so the folder's pixels are never all held."""
        if len(images) < 2:
            raise ValueError("folder zero-shot scoring needs at least 2 images")

        def chunks():
            for start in range(0, len(images), batch_size):
                pixels = self.processor.preprocess(images[start : start + batch_size])
                yield pixels["pixel_values"], pixels["image_sizes"], pixels.get("zoom_pixel_values")

        with torch.no_grad():
            crop_maps, scores, distances = self.model.detect_folder(chunks())
        calibration = self.model.config.calibration
        far = distances.tolist() if distances is not None else [None] * len(images)
        warnings = [novelty_warning(calibration, d, "batch") for d in far]
        return self._reports(images, crop_maps, scores, distances, warnings)

    # -- language ---------------------------------------------------------------------------------
    def _inputs(self, messages, image: Image.Image, visual: VisualEncoding, pixels: dict):
        for message in messages:
            content = message["content"]
            if isinstance(content, str) and len(content) > MAX_QUESTION_CHARS:
                raise ValueError(f"the question is too long ({len(content)} characters; at most {MAX_QUESTION_CHARS})")
        references = visual.extras.get("reference_images", [])  # normal references shown before the image
        prompt = self.processor.render(as_chat(messages, references=len(references)))
        level, where = None, ""
        if visual.scores is not None:
            level = self.model.config.suspicion_level(float(visual.scores[0]))
            if "{where}" in self.model.config.suspicion_marker:  # the expert's location, for an anomalous verdict
                where = where_text(self._evidence(image, visual)["location"])
        none = [None] * len(references)
        return self.processor(
            prompt, [*references, image], levels=[*none, level], pixels=pixels, wheres=["" for _ in none] + [where]
        )

    def _generation(self, max_new_tokens: int, **overrides) -> GenerationConfig:
        config = GenerationConfig(**self.generation_config.to_dict())
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        config.temperature = config.top_p = config.top_k = None
        tokenizer = self.processor.tokenizer
        if config.eos_token_id is None:
            config.eos_token_id = tokenizer.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        for key, value in overrides.items():
            setattr(config, key, value)
        config.return_dict_in_generate = True  # the cache comes back for the next turn
        return config

    def _generate(
        self, inputs, visual, generation: GenerationConfig, streamer=None, session: str | None = None
    ) -> torch.Tensor:
        """New token ids; reuses and updates the conversation's KV cache when the prompt extends it."""
        ids = inputs["input_ids"]
        key = None
        if "key" in visual.extras and self.kv_cache.max_bytes > 0:
            key = f"{session or ''}|{visual.extras['key']}"
        cache, _ = (None, 0)
        if key is not None:
            image_positions = (ids[0] == self.model.config.image_token_index).nonzero()
            min_prefix = int(image_positions[-1]) + 1 if image_positions.numel() else 1
            cache, _ = self.kv_cache.take(key, ids[0], min_prefix)
        out = self.model.generate(
            ids,
            visual=visual,
            attention_mask=inputs["attention_mask"],
            generation_config=generation,
            streamer=streamer,
            past_key_values=cache,
        )
        if key is not None and output_cache(out) is not None:
            self.kv_cache.put(key, torch.cat([ids[0].cpu(), out.sequences[0].cpu()]), output_cache(out))
        return out.sequences

    def chat(
        self,
        messages,
        image,
        references=None,
        stream: bool = True,
        max_new_tokens: int = 256,
        session: str | None = None,
        **generate_kwargs,
    ):
        """Multi-turn chat about one image. Yields text chunks with `stream=True`, else returns the answer.

        A follow-up reuses the encoded image and the KV cache of the conversation so far, so only its new
        tokens are prefilled; `session` keeps the caches of different users apart.
        """
        image, visual, pixels = self.encode(image, references)
        note = ""
        if visual.scores is not None and not references:
            evidence = self._evidence(image, visual)
            if evidence["out_of_domain"]:
                # the LLM only knows the training images' objects; with normal references the score rests on them
                answer = out_of_domain_answer(evidence)
                return iter([answer]) if stream else answer
            if self.model.config.calibration.is_novel(evidence["domain_distance"]):
                note = NEW_KIND_NOTE
        # earlier answers reach the LLM as it wrote them: without the note, which it never generated (and the
        # conversation's KV cache holds the tokens it did)
        messages = [
            {**m, "content": m["content"].removesuffix(NEW_KIND_NOTE)}
            if m.get("role") == "assistant" and isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
        inputs = self._inputs(messages, image, visual, pixels)
        generation = self._generation(max_new_tokens, **generate_kwargs)
        if not stream:
            return self.processor.decode(self._generate(inputs, visual, generation, session=session)[0]) + note
        return self._stream(inputs, visual, generation, session, note)

    def _stream(self, inputs, visual, generation, session=None, note: str = "") -> Iterator[str]:
        streamer = TextIteratorStreamer(
            self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        failure: list[BaseException] = []

        def run():
            try:
                self._generate(inputs, visual, generation, streamer, session)
            except BaseException as error:  # surfaced in the consumer's thread below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from (chunk for chunk in streamer if chunk)
        thread.join()
        if failure:
            raise failure[0]
        if note:
            yield note

    def analyze(
        self, image, question: str | None = None, references=None, max_new_tokens: int = 128, **generate_kwargs
    ) -> AnomalyReport:
        """Answer one question about the image, with the evidence."""
        question = question if question is not None else DEFAULT_QUESTION
        if not question.strip():
            raise ValueError("the question is empty")
        references = [load_image(r) for r in references or []]  # read once: encode, chat and the warnings share them
        image, visual, pixels = self.encode(image, references)
        answer = self.chat(
            [{"role": "user", "content": question}],
            image,
            references,
            stream=False,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )
        evidence = self._evidence(image, visual)
        warnings = (
            report_warnings(
                image,
                references,
                self.model.config.calibration,
                visual.extras.get("reference_floor"),
                evidence["domain_distance"],
            )
            if self.has_expert
            else []
        )
        return AnomalyReport(answer=answer.strip(), model=self.name, image=image, warnings=warnings, **evidence)

    def visualize(self, report: AnomalyReport, image=None) -> Image.Image:
        """The input with the heatmap, the mask contours and the boxes drawn over it."""
        from .visualize import overlay

        base = load_image(image) if image is not None else report.image
        if base is None:
            raise ValueError("the report holds no image; pass the image")
        title = None
        if report.pred_score is not None:
            title = f"{'ANOMALOUS' if report.pred_label else 'normal'}  score {report.pred_score:.2f}"
        return overlay(base, report.anomaly_map, report.pred_mask, report.boxes, title=title)
