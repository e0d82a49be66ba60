"""What the instruction writer can say: question and answer templates, and per-defect descriptions.

Every slot has many phrasings so a model trained on the conversations learns the behaviour (verdict,
where, what, severity, cause), not one sentence. Defect folder names (MVTec AD, VisA, the synthetic
generator) map to a description *kind* by their words; unknown names fall back to a generic kind.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DefectKind:
    """How to talk about one kind of defect."""

    names: tuple[str, ...]  # noun phrases with article, e.g. "a thin scratch"
    looks: tuple[str, ...]  # full sentences describing its appearance
    causes: tuple[str, ...]  # full sentences giving a likely cause
    gravity: int = 0  # added to the size-based severity (structural damage weighs more)


KINDS: dict[str, DefectKind] = {
    "scratch": DefectKind(
        ("a scratch", "a thin scratch", "a linear scratch", "a fine scratch mark", "a narrow scrape"),
        (
            "It is a thin line that catches the light differently from the surrounding surface.",
            "A narrow streak runs across the surface, brighter or darker than its surroundings.",
            "The mark is long and narrow, like something hard was dragged over the surface.",
        ),
        (
            "Most likely abrasion from handling or from contact with a sharp edge on the line.",
            "A hard particle or tool probably scraped the surface during transport or assembly.",
            "It looks like contact damage, for example sliding against a fixture.",
        ),
    ),
    "crack": DefectKind(
        ("a crack", "a fine crack", "a jagged crack", "a fracture line", "a hairline crack"),
        (
            "A dark, jagged line with small branches breaks the surface.",
            "The surface is split along an irregular dark line that forks in places.",
            "It is a thin zig-zag fracture, darker than the material around it.",
        ),
        (
            "Probably mechanical stress or an impact that the material could not absorb.",
            "Likely caused by thermal stress or a drop during handling.",
            "A brittle spot in the material may have fractured under load.",
        ),
        gravity=1,
    ),
    "hole": DefectKind(
        ("a hole", "a round hole", "a puncture", "a pit", "a missing piece of material"),
        (
            "A dark pit interrupts the surface, with a bright rim on one side and a shadow on the other.",
            "Material is missing there: a dark opening with a sharp edge.",
            "It is a roughly round opening that goes into the material.",
        ),
        (
            "Probably a puncture from a sharp object, or material that broke out during machining.",
            "It may come from a poke during handling or a void in the material.",
            "Likely a manufacturing fault: a piece was torn out or never formed.",
        ),
        gravity=1,
    ),
    "stain": DefectKind(
        ("a stain", "a discoloured stain", "a blot", "a smudge", "a liquid mark"),
        (
            "A soft-edged blot of a different colour covers part of the surface.",
            "The area is discoloured with a blurry edge, like a dried liquid.",
            "An irregular patch of tinted residue sits on top of the surface.",
        ),
        (
            "Probably a liquid, oil or glue residue that dried on the surface.",
            "Likely contamination from a lubricant or a spill on the production line.",
            "It looks like residue left after cleaning or from a dirty fixture.",
        ),
    ),
    "contamination": DefectKind(
        (
            "foreign material",
            "a patch of foreign texture",
            "contamination",
            "a foreign particle cluster",
            "an alien texture",
        ),
        (
            "An irregular blob with a texture that does not belong to this surface sits on it.",
            "Part of the surface shows a pattern and colour unlike the rest, with ragged edges.",
            "A foreign substance with its own texture covers an irregular area.",
        ),
        (
            "Probably debris or foreign particles that landed on the part during production.",
            "Likely contamination from another material on the line.",
            "It may be dirt or a fragment of packaging stuck to the surface.",
        ),
    ),
    "misplaced": DefectKind(
        ("a mismatched patch", "a misplaced piece", "a patch that does not fit", "an out-of-place region"),
        (
            "A rectangular region repeats part of the surface but with the wrong orientation or brightness.",
            "A piece of the pattern is misaligned and lit differently from its surroundings.",
            "The region looks like part of the same material, pasted in the wrong place.",
        ),
        (
            "Probably a misplaced or flipped component, or a repair with mismatched material.",
            "Likely an assembly error: the piece is in the wrong position or orientation.",
            "It may be a patch of material from elsewhere that was fixed in place.",
        ),
    ),
    "blend": DefectKind(
        ("a foreign patch", "a blended-in patch", "an inconsistent patch", "a region with the wrong texture"),
        (
            "The colours blend in smoothly but the texture inside the region is wrong for this surface.",
            "A rounded area shows a different structure, with edges that fade into the surroundings.",
            "The patch matches the local colour but not the pattern of the material.",
        ),
        (
            "Probably an inclusion of different material or a local change in the process.",
            "Likely a material inhomogeneity formed during production.",
            "It may be a filled repair or an embedded foreign piece.",
        ),
    ),
    "broken": DefectKind(
        ("a broken area", "a damaged section", "a chipped edge", "breakage"),
        (
            "Part of the object is broken off or chipped, leaving an irregular edge.",
            "The outline is damaged: a piece is missing and the edge is rough.",
        ),
        ("Probably an impact during handling or transport.", "Likely a drop or a collision with another part."),
        gravity=1,
    ),
    "bent": DefectKind(
        ("a bend", "a deformation", "a bent section"),
        (
            "The shape is deformed: a part is bent away from where it should be.",
            "A section is out of its normal geometry.",
        ),
        ("Probably excessive force during assembly or packing.", "Likely mechanical deformation from handling."),
    ),
    "color": DefectKind(
        ("a colour defect", "a discolouration", "an off-colour region"),
        (
            "Part of the object has the wrong colour compared with the rest.",
            "A region is tinted differently from a normal sample.",
        ),
        ("Probably a dye or coating inconsistency.", "Likely a material mix-up or uneven coating."),
    ),
    "cut": DefectKind(
        ("a cut", "a slit", "a cut mark"),
        ("A straight, sharp-edged opening is cut into the material.", "The material is sliced along a clean line."),
        ("Probably a blade or sharp edge slipped during processing.", "Likely a cutting tool touched the part."),
        gravity=1,
    ),
    "missing": DefectKind(
        ("a missing part", "an absent component", "missing material"),
        ("A part that should be there is absent.", "The object is incomplete: one element is missing."),
        ("Probably an assembly step was skipped.", "Likely the part fell off or was never mounted."),
        gravity=1,
    ),
    "print": DefectKind(
        ("a print defect", "a faulty imprint", "a misprint"),
        ("The printed marking is wrong, smeared or incomplete.", "The imprint does not match a normal sample."),
        ("Probably a printing or stamping fault.", "Likely a misaligned or dirty print head."),
    ),
    "thread": DefectKind(
        ("a loose thread", "a stray fibre", "a pulled thread"),
        ("A thread sticks out of the surface or lies across it.", "A single fibre breaks the regular pattern."),
        ("Probably a pulled fibre from weaving or handling.", "Likely a loose end left during manufacturing."),
    ),
    "generic": DefectKind(
        ("a defect", "an anomaly", "an irregular region", "a flaw"),
        (
            "That region differs visibly from what a normal sample looks like.",
            "Its appearance breaks the regular structure of the rest of the image.",
        ),
        (
            "The cause is hard to tell from one image; it is likely a production fault.",
            "It probably comes from the manufacturing process or from handling.",
        ),
    ),
}

#: words in a defect folder name → description kind (first match in name order wins)
KEYWORDS = {
    "scratch": "scratch",
    "scrape": "scratch",
    "crack": "crack",
    "fracture": "crack",
    "hole": "hole",
    "poke": "hole",
    "pit": "hole",
    "stain": "stain",
    "glue": "stain",
    "oil": "stain",
    "liquid": "stain",
    "spot": "stain",
    "contamination": "contamination",
    "foreign": "contamination",
    "texture": "contamination",
    "cut_paste": "misplaced",
    "misplaced": "misplaced",
    "flip": "misplaced",
    "swap": "misplaced",
    "poisson": "blend",
    "patch": "blend",
    "broken": "broken",
    "damaged": "broken",
    "chip": "broken",
    "split": "broken",
    "bent": "bent",
    "squeeze": "bent",
    "squeezed": "bent",
    "fold": "bent",
    "color": "color",
    "colour": "color",
    "shading": "color",
    "type": "color",
    "cut": "cut",
    "missing": "missing",
    "print": "print",
    "imprint": "print",
    "thread": "thread",
    "fabric": "thread",
}


def defect_kind(defect_type: str | None) -> str:
    """The description kind of a defect folder name ("metal_contamination" → "contamination")."""
    name = (defect_type or "").lower()
    if name in KEYWORDS:
        return KEYWORDS[name]
    for word in name.replace("-", "_").split("_"):
        if word in KEYWORDS:
            return KEYWORDS[word]
    return "generic"


#: first questions a "yes" answers as "defective"
DEFECT_QUESTIONS = (
    "Is there any anomaly in this image?",
    "Is there a defect on this {noun}?",
    "Inspect this {noun}. Is it defective?",
    "Does this {noun} have any defects?",
    "Is anything wrong with this {noun}?",
    "Are there any abnormalities in the image?",
    "Can you spot a defect here?",
    "Do you see anything unusual on this {noun}?",
    "Is this {noun} damaged?",
)
#: first questions that a plain yes/no would not answer clearly
OPEN_QUESTIONS = (
    "Please check the {noun} for defects.",
    "Is this {noun} normal or anomalous?",
    "Would this {noun} pass a visual inspection?",
    "Look at this {noun} and tell me whether it is defective.",
    "Quality check: is this {noun} OK?",
    "Is the {noun} in this picture free of defects?",
    "Inspect the image and report what you find.",
    # the question `anomaly-assistant ask` and `AnomalyAssistant.analyze` put when none is given
    "Is there any anomaly in this image? If so, where is it and what does it look like?",
)

#: anomalous answers to a yes/no defect question
ANOMALY_YES = (
    "Yes. There is {what} in the {where} of the {noun}.",
    "Yes, this {noun} is defective: {what} is visible in the {where}.",
    "Yes, there is a problem. The {where} shows {what}.",
    "Yes. The {noun} has {what}; it is {size} and located in the {where}.",
)
#: anomalous answers that fit any question
ANOMALY_PLAIN = (
    "Anomalous. I see {what} in the {where}, covering a {size} area.",
    "This {noun} is not normal; {what} appears in the {where} of the image.",
    "Defect found: {what}, {size} in size, in the {where}.",
    "It does not pass: {what} sits in the {where} of the {noun}.",
    "I found {what} in the {where}. The rest of the {noun} looks normal.",
    "There is an anomaly: {what} in the {where} region.",
    "The {noun} is defective. {What} is visible in the {where}.",
)
NORMAL_NO = (
    "No, this {noun} looks normal. {normal}",
    "No defect found. {normal}",
    "No, nothing is wrong with it. {normal}",
    "No. {normal}",
)
NORMAL_PLAIN = (
    "The {noun} appears normal: {normal_lower}",
    "Normal. {normal}",
    "I see no anomaly on this {noun}. {normal}",
    "It passes the inspection; {normal_lower}",
    "This {noun} is free of defects. {normal}",
    "Everything looks as expected. {normal}",
)

NORMAL_DETAILS = (
    "The surface is consistent and I see no scratches, stains or missing parts.",
    "Its texture and colour are uniform across the whole image.",
    "Nothing breaks the regular structure of the material.",
    "Edges, surface and colour all look as expected.",
    "There are no cracks, holes or foreign material anywhere.",
)


@dataclass(frozen=True)
class FollowUp:
    """A follow-up question slot: its phrasings, and whether it applies to anomalous/normal images."""

    name: str
    questions: tuple[str, ...]
    anomalous: bool = True
    normal: bool = False


FOLLOW_UPS = (
    FollowUp(
        "describe",
        (
            "Describe the defect.",
            "What does it look like?",
            "Can you describe the anomaly in more detail?",
            "Tell me more about what you see there.",
            "How would you describe it?",
        ),
    ),
    FollowUp(
        "severity",
        (
            "How severe is it?",
            "Is this defect serious?",
            "Would you reject this part?",
            "How bad is the damage?",
            "Is it a critical defect?",
        ),
    ),
    FollowUp(
        "cause",
        (
            "What could have caused it?",
            "What is the likely cause?",
            "Why might this have happened?",
            "Any idea where this defect comes from?",
            "What is the probable origin of this defect?",
        ),
    ),
    FollowUp(
        "where",
        (
            "Where exactly is it?",
            "Which part of the image is affected?",
            "Can you point to its location?",
            "Where should I look?",
            "How big is it and where?",
        ),
    ),
    FollowUp(
        "confirm",
        (
            "Are you sure? Please look again.",
            "Check the edges too. Still nothing?",
            "Could there be a subtle defect you missed?",
            "Double-check, please.",
        ),
        anomalous=False,
        normal=True,
    ),
    FollowUp(
        "normal_describe",
        ("Describe the {noun}.", "What does a normal {noun} look like here?", "What did you check?"),
        anomalous=False,
        normal=True,
    ),
)

SEVERITIES = ("minor", "moderate", "severe")
SIZE_STEPS = {"tiny": 0, "small": 0, "medium": 1, "large": 2}
SEVERITY_ANSWERS = {
    "minor": (
        "It is a minor defect: a {size} {kind_noun}, cosmetic rather than structural.",
        "Minor. The {size} {kind_noun} is unlikely to affect function, but it is visible.",
        "I would rate it minor; a strict cosmetic check would still flag it.",
    ),
    "moderate": (
        "Moderate. The {kind_noun} is {size} and noticeable; I would set the part aside for review.",
        "It is a moderate defect: clearly visible, and worth rejecting under a normal quality standard.",
        "Moderately severe; a {size} {kind_noun} like this usually fails inspection.",
    ),
    "severe": (
        "Severe. A {size} {kind_noun} like this compromises the part; reject it.",
        "It is serious: the {kind_noun} is {size} and could affect function. I would reject it.",
        "Severe. This part should not ship.",
    ),
}
WHERE_ANSWERS = (
    "It is in the {where} of the image and covers a {size} area, about {percent} of the image.",
    "Look at the {where}: the defect is {size}, roughly {percent} of the image.",
    "The affected region is in the {where}; it is {size} (about {percent} of the image).",
)
DESCRIBE_ANSWERS = (
    "{look} It is {size} and located in the {where}.",
    "{look} You can find it in the {where}.",
    "In the {where} there is {what}. {look}",
)
CONFIRM_ANSWERS = (
    "Yes, I looked again. {normal}",
    "I am confident it is normal. {normal}",
    "Still nothing: {normal_lower}",
)
NORMAL_DESCRIBE_ANSWERS = (
    "It is a normal {noun}. {normal}",
    "I checked the surface, the edges and the colour. {normal}",
)
