"""anomaly-assistant: a multimodal-LLM assistant for visual anomaly inspection.

from assistant import AnomalyAssistant
assistant = AnomalyAssistant.from_pretrained("default")
report = assistant.analyze("part.png")
report.pred_score, report.pred_label, report.boxes, report.location, report.answer
assistant.visualize(report).save("overlay.png")
"""

__version__ = "0.1.0"

_LAZY = {
    "AnomalyAssistant": "inference",
    "AnomalyReport": "inference",
    "AnomalyAssistantConfig": "config",
    "AnomalyAssistantModel": "modeling",
    "AssistantProcessor": "processing",
}


def __getattr__(name):  # keep `import assistant` light: torch/transformers load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'assistant' has no attribute {name!r}")


__all__ = list(_LAZY)
