"""The evaluation tasks, by the name `python -m eval.run TASK` takes.

| task | data | prompt | metric |
| --- | --- | --- | --- |
| `visa-dr-detection` | VisA-D&R `test_data.json` | the published yes/no question | per-class accuracy/precision/recall/F1, verdict and text columns |
| `visa-dr-reasoning` | VisA-D&R `visa_dr.json` | the benchmark's questions, multi-turn | ROUGE-L, embedding similarity, optional LLM judge |
| `ad` | MVTec-layout folder, VisA CSV, synthetic set | none (detection-only) | image/pixel AUROC, AP, F1-max, AUPRO, AUPIMO |
| `mmad` | MMAD `mmad.json` and its image folders | the inspector instruction, each question on its own, 1 template | accuracy per dataset x type, two answer rules, verdict column |
"""

from __future__ import annotations

from .ad import ADTask
from .base import DataError, Dataset, Sample, Scores, Task
from .mmad import MMADTask
from .visa_dr_detection import DetectionTask
from .visa_dr_reasoning import ReasoningTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (DetectionTask, ReasoningTask, ADTask, MMADTask)}


def get_task(name: str) -> Task:
    return TASKS[name]()


__all__ = ["TASKS", "DataError", "Dataset", "Sample", "Scores", "Task", "get_task"]
