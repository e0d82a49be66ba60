"""Synthetic anomaly generator throughput at 256×256 on one CPU core.

    python bench/bench_synth.py                 # default: 140 images, all families, half anomalous
    python bench/bench_synth.py --n 60 --anomaly-ratio 1   # anomalous images only

Prints images/s for (1) generation in memory (normal + defect + exact mask) and (2) the full
`write_dataset` run to a temporary folder (PNG images, masks, metadata). Target: ≥ 50 images/s.
"""

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_name] = "1"  # before numpy is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.synth import FAMILIES, SynthPlan, make_sample, write_dataset  # noqa: E402

TARGET = 50.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=140, help="images per run (spread over the families)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--anomaly-ratio", type=float, default=0.5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

    plan = SynthPlan(n=max(args.n // len(FAMILIES), 1), size=args.size, seed=0, anomaly_ratio=args.anomaly_ratio)
    jobs = [(family, index, role[1]) for family in plan.families for index, role in enumerate(plan.roles())]
    make_sample("wood", 0, 0, args.size, "stain")  # warm-up (imports, caches)

    start = time.perf_counter()
    for family, index, defect_type in jobs:
        make_sample(family, index, plan.seed, args.size, defect_type)
    in_memory = len(jobs) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        counts = write_dataset(out, plan)
        to_disk = sum(counts.values()) / (time.perf_counter() - start)

    anomalous = sum(1 for job in jobs if job[2] is not None)
    print(
        f"synth {args.size}x{args.size}, 1 core, {len(jobs)} images ({anomalous} anomalous, {len(plan.families)} families)"
    )
    print(f"  in memory (image + exact mask):   {in_memory:6.1f} images/s")
    print(
        f"  write_dataset (PNG + metadata):   {to_disk:6.1f} images/s   target >= {TARGET:.0f}: {'ok' if to_disk >= TARGET else 'BELOW'}"
    )


if __name__ == "__main__":
    main()
