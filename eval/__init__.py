"""Evaluation: tasks x model adapters, inference cached apart from scoring.

Scoring modules (model-free, safe and cheap to import; heavy models load lazily on first use):

- `eval.metrics`: anomaly-detection metrics (image AUROC / AP / F1-max, pixel AUROC, AUPRO, AUPIMO)
  and `compute_ad_metrics`.
- `eval.text_metrics`: reasoning scores (ROUGE-L, sentence-embedding similarity, LLM-as-judge).
- `eval.detection`: VisA-D&R yes/no detection scoring per class.
"""
