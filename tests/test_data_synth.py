"""The synthetic anomaly generator: exact masks, determinism, the written MVTec layout."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data_prep.readers import read_mvtec
from data_prep.synth import ALL_DEFECT_TYPES, DEFECT_TYPES, FAMILIES, SynthPlan, make_normal, make_sample, write_dataset
from data_prep.synth.poisson import poisson_blend
from data_prep.synth.shapes import bbox


def test_there_are_at_least_five_families_each_drawing_varied_images():
    assert len(FAMILIES) >= 5
    for name in FAMILIES:
        first, _ = make_normal(name, 64, np.random.default_rng(0))
        second, _ = make_normal(name, 64, np.random.default_rng(1))
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8
        assert first.std() > 3, f"{name} is flat"
        assert not np.array_equal(first, second)


@pytest.mark.parametrize("family", ["wood", "fabric", "pill", "cap"])
@pytest.mark.parametrize("defect_type", ALL_DEFECT_TYPES)
def test_mask_is_exactly_the_changed_pixels(family, defect_type):
    for index in range(3):
        sample = make_sample(family, index, seed=7, size=96, defect_type=defect_type)
        changed = (sample.image != sample.normal).any(axis=-1)
        assert sample.mask.any()
        np.testing.assert_array_equal(sample.mask, changed)
        assert sample.bbox == bbox(sample.mask) and sample.area == int(sample.mask.sum())
        assert np.abs(sample.image[sample.mask].astype(int) - sample.normal[sample.mask]).max(-1).mean() >= 6


@pytest.mark.parametrize("defect_type", ["scratch", "crack", "stain", "hole", "shading"])
def test_defects_stay_on_the_object(defect_type):
    for index in range(4):
        sample = make_sample("pill", index, seed=3, size=96, defect_type=defect_type)
        # the pill is bright, its background dark: no masked pixel may lie on the background
        background = ndimage.binary_erosion(sample.normal.mean(-1) < 90, iterations=2)
        assert background.mean() > 0.5
        assert not (sample.mask & background).any()


def test_shading_is_a_large_region_made_darker_or_brighter_and_drawn_only_when_asked():
    assert "shading" in ALL_DEFECT_TYPES and "shading" not in DEFECT_TYPES  # the standard sets stay as they were
    darker = brighter = 0
    for index in range(12):
        sample = make_sample("metal", index, seed=5, size=128, defect_type="shading")
        area = sample.mask.mean()
        assert 0.08 < area < 0.6, area  # every standard type covers at most about a tenth of the image
        change = sample.image[sample.mask].astype(float).mean() - sample.normal[sample.mask].astype(float).mean()
        darker, brighter = darker + (change < -10), brighter + (change > 10)
        assert ndimage.label(sample.mask)[1] <= 3  # one region (a fringe may leave a few specks)
    assert darker and brighter


def test_samples_are_deterministic_from_the_seed():
    a = make_sample("metal", 4, seed=11, size=64, defect_type="poisson_patch")
    b = make_sample("metal", 4, seed=11, size=64, defect_type="poisson_patch")
    c = make_sample("metal", 4, seed=12, size=64, defect_type="poisson_patch")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_a_generated_normal_too_flat_for_the_defect_is_drawn_again_and_a_given_one_is_refused(monkeypatch):
    # a crop of a photo's empty black sky cannot show a dark crack: the family draws another crop, while a normal
    # the caller gave is never replaced
    import data_prep.synth.generate as generate
    from data_prep.synth.defects import InvisibleDefectError

    black = np.zeros((64, 64, 3), dtype=np.uint8)
    drawn = []

    def flat_then_textured(family, size, rng):
        drawn.append(family)
        if len(drawn) == 1:
            return black, None
        return make_normal("wood", size, rng)

    monkeypatch.setattr(generate, "make_normal", flat_then_textured)
    sample = generate.make_sample("wood", 0, seed=5, size=64, defect_type="crack")
    assert len(drawn) == 2 and sample.normal.std() > 3
    assert np.abs(sample.image[sample.mask].astype(int) - sample.normal[sample.mask]).max(-1).mean() >= 6
    with pytest.raises(InvisibleDefectError, match="visible crack"):
        generate.make_sample("wood", 0, seed=5, size=64, defect_type="crack", normal=black)


def test_a_run_takes_foreign_textures_only_from_its_own_families(tmp_path, monkeypatch):
    # a held-out family must not enter training as the foreign texture of a defect either
    import data_prep.synth.generate as generate

    drawn = []
    real = generate.make_normal

    def recording(family, size, rng):
        drawn.append(family)
        return real(family, size, rng)

    monkeypatch.setattr(generate, "make_normal", recording)
    plan = SynthPlan(
        n=16, families=("wood", "metal"), size=48, anomaly_ratio=1.0, defect_types=("foreign_texture", "poisson_patch")
    )
    write_dataset(tmp_path / "two", plan)
    assert set(drawn) == {"wood", "metal"} and len(drawn) > 2 * 16  # donors were drawn, all from the run
    drawn.clear()
    write_dataset(
        tmp_path / "one",
        SynthPlan(
            n=6, families=("cap",), size=48, anomaly_ratio=1.0, defect_types=("foreign_texture", "poisson_patch")
        ),
    )
    assert set(drawn) == {"cap"}  # no other family: no family enters as a foreign texture
    result = read_mvtec(tmp_path / "one")
    assert len(result.records) == 6 and result.problems == []


def test_a_one_family_run_still_pastes_a_texture_that_looks_foreign():
    """Without another family, foreign textures are noise of random colours (`noise_texture`), not the image itself
    rotated: on a photographed surface such a patch had been the same texture (the model scored it at chance)."""
    from scipy import ndimage

    shifts, detail = [], []
    for index in range(6):
        sample = make_sample("gravel", index, seed=3, size=96, defect_type="foreign_texture", donors=["gravel"])
        inside, normal = sample.image[sample.mask].astype(float), sample.normal[sample.mask].astype(float)
        shifts.append(np.abs(inside.mean(0) - normal.mean(0)).max())
        sample = make_sample("gravel", index, seed=3, size=96, defect_type="poisson_patch", donors=["gravel"])
        edges = [
            np.abs(ndimage.laplace(x.astype(float).mean(-1)))[sample.mask].mean() for x in (sample.image, sample.normal)
        ]
        detail.append(abs(np.log((edges[0] + 1) / (edges[1] + 1))))
    # the rotated image itself: a colour shift of 5 grey levels and a change of detail of 0.04 on average
    assert np.mean(shifts) > 20 and np.mean(detail) > 0.2


def test_poisson_blend_keeps_source_gradients_inside_and_target_outside():
    rng = np.random.default_rng(0)
    target = rng.random((40, 50, 3)).astype(np.float32) * 80
    source = rng.random((40, 50, 3)).astype(np.float32) * 200
    region = np.zeros((40, 50), bool)
    region[10:30, 12:40] = True
    out = poisson_blend(target, source, region)

    def laplacian(a):
        return a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]

    inside = ndimage.binary_erosion(region)[1:-1, 1:-1]
    outside = ~ndimage.binary_dilation(region)[1:-1, 1:-1]
    assert np.abs(laplacian(out) - laplacian(source))[inside].max() < 1e-2
    assert np.abs(laplacian(out) - laplacian(target))[outside].max() < 1e-2
    np.testing.assert_array_equal(out[0], target[0])
    # a source that only differs by a constant has the target's gradients: nothing changes
    np.testing.assert_allclose(poisson_blend(target, target + 50, region), target, atol=1e-3)


def test_written_dataset_has_the_mvtec_layout_and_metadata(tmp_path):
    out = tmp_path / "synth"
    counts = write_dataset(out, SynthPlan(n=16, families=("wood", "pill"), size=64, seed=1))
    assert counts == {"wood": 16, "pill": 16}
    for family in ("wood", "pill"):
        assert len(list((out / family / "train/good").glob("*.png"))) == 6
        assert len(list((out / family / "test/good").glob("*.png"))) == 2
        assert {p.name for p in (out / family / "ground_truth").iterdir()} == set(DEFECT_TYPES)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 32
    for line in lines:
        if line["label"] == 1:
            mask = np.asarray(Image.open(out / line["mask"])) > 0
            assert (
                line["defect_type"] in line["image"] and line["area"] == int(mask.sum()) and line["bbox"] == bbox(mask)
            )
        else:
            assert line["mask"] is None and line["bbox"] is None
    result = read_mvtec(out)
    assert len(result.records) == 32 and result.problems == []


def test_writer_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    plan = SynthPlan(n=2, families=("carpet",), size=32)
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path, plan)
    write_dataset(tmp_path, plan, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "carpet/train/good/000.png").is_file()


def test_user_normals_are_copied_exactly_outside_the_mask(tmp_path):
    normals = tmp_path / "normals"
    normals.mkdir()
    sources = []
    for index in range(4):
        image, _ = make_normal("fabric", 48, np.random.default_rng(100 + index))
        Image.fromarray(image).save(normals / f"{index}.png")
        sources.append(image)
    out = tmp_path / "out"
    write_dataset(out, SynthPlan(n=8, families=("mine",), size=48, seed=2, normals=sorted(normals.glob("*.png"))))
    for line in map(json.loads, (out / "metadata.jsonl").read_text().splitlines()):
        image = np.asarray(Image.open(out / line["image"]))
        mask = np.asarray(Image.open(out / line["mask"])) > 0 if line["mask"] else np.zeros(image.shape[:2], bool)
        matches = [s for s in sources if np.array_equal(image[~mask], s[~mask])]
        assert len(matches) == 1, line["image"]
        assert (image[mask] != matches[0][mask]).any(-1).all()


def test_parallel_generation_writes_the_same_dataset(tmp_path):
    """`workers` > 1 (the train command and `data_prep synth` use one per core) gives byte-identical images, masks
    and metadata: a recipe's data do not depend on the machine that generated them."""
    plan = SynthPlan(n=12, families=("wood", "cap"), size=48, seed=5, anomaly_ratio=0.5)
    write_dataset(tmp_path / "one", plan, workers=1)
    write_dataset(tmp_path / "three", plan, workers=3)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 1 + 24 + 12  # metadata, 24 images, 12 masks
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


def test_forked_workers_run_torch_ops_after_the_parent_ran_parallel_ones(tmp_path):
    """`ordered_map`'s forked workers (stage 1's image cache, the generator) run torch ops large enough for a
    parallel region after the parent process ran one: they used to hang in the OpenMP pool inherited through
    the fork, and stage 1 never started."""
    import subprocess
    import sys

    script = tmp_path / "fork.py"
    script.write_text(
        "import torch\n"
        "from data_prep.parallel import ordered_map\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(1000, 1000)\n"
        "(x @ x).sum(); torch.ones(10**6).add(1).sum()\n"
        "print(list(ordered_map(lambda i: float((torch.ones(300000) * i).sum()), range(4), 2, chunksize=1)))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.0, 300000.0, 600000.0, 900000.0]"
