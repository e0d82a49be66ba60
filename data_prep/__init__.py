"""Data preparation for the anomaly assistant.

- `data_prep.readers`: MVTec AD, VisA, LLaVA conversation JSON (Anomaly-Instruct-125k) and VisA-D&R
  readers; each returns a `ReadResult` (records + problems) that converts to a `datasets.Dataset`.
- `data_prep.synth`: the synthetic anomaly generator (procedural families, DRAEM/AnomalyGPT defects).
- `data_prep.instruct`: LLaVA-format instruction conversations from any (image, mask, type) source.
- `data_prep.check`: detects a dataset's format and lists every problem in it.

Importing this package needs only numpy, scipy and pillow; `datasets` is imported lazily.
"""
