"""Readers for the supported dataset formats. Each returns a `data_prep.records.ReadResult`.

| function | format |
| --- | --- |
| `read_mvtec(root)` | MVTec AD layout: `<class>/train/good`, `<class>/test/<defect>`, `<class>/ground_truth/<defect>/<name>_mask.png` |
| `read_visa(root)` | VisA root with `split_csv/1cls.csv` (object,split,label,image,mask) |
| `read_llava(path)` | LLaVA conversation JSON (Anomaly-Instruct-125k) |
| `read_visa_dr_detection(path)` | VisA-D&R `test_data.json` |
| `read_visa_dr_reasoning(path)` | VisA-D&R `visa_dr.json` |
"""

from .llava import read_llava
from .mvtec import read_mvtec
from .visa import read_visa
from .visa_dr import read_visa_dr_detection, read_visa_dr_reasoning

__all__ = ["read_mvtec", "read_visa", "read_llava", "read_visa_dr_detection", "read_visa_dr_reasoning"]
