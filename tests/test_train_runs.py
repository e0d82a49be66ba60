"""Tiny training runs on CPU: stage 1 and 2 learn, checkpoints are complete and resumable, merge is exact,
the distributed path (torchrun, 2 gloo processes) works, QLoRA steps, bad data is skipped, NaN stops."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/train/debug_tiny.yaml"
SMALL_DATA = ["data.synth.n=12", "data.synth.families=[wood]"]


def config(tmp, *overrides):
    from train.config import load_config

    return load_config(RECIPE, [f"output_dir={tmp}", *SMALL_DATA, "trainer.logging_steps=1", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    """step → loss from the newest checkpoint's trainer state."""
    from train.trainer import last_checkpoint

    state = json.loads((Path(last_checkpoint(run_dir)) / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def falls(values: dict[int, float], k: int = 3) -> tuple[float, float]:
    series = [values[s] for s in sorted(values)]
    return float(np.mean(series[:k])), float(np.mean(series[-k:]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Synthetic data (one image broken, one missing) and a tiny random base model, shared by the runs."""
    from train.build import init_model, instruction_corpus, synthetic_data

    root = tmp_path_factory.mktemp("train")
    cfg = config(root)
    images, instructions = synthetic_data(cfg, root / "data")
    corpus = instruction_corpus(instructions)
    good = sorted((images / "wood" / "train" / "good").glob("*.png"))
    good[0].write_bytes(b"not a png at all")  # broken
    good[1].unlink()  # missing (the instruction JSON still names it)
    base = init_model(cfg.model.init, corpus, root / "base")
    return {"root": root, "images": images, "instructions": instructions, "base": base}


@pytest.fixture(scope="module")
def full_run(prepared, tmp_path_factory):
    """Stage 1 (60 steps) then stage 2 (LoRA, 16 steps), in process."""
    from train.run import run

    out = tmp_path_factory.mktemp("run")
    cfg = config(
        out,
        f"model.path={prepared['base']}",
        f"data.masked={prepared['images']}",
        f"data.instructions={prepared['instructions']}",
        "stage1_steps=60",
        "trainer.max_steps=16",
        "trainer.lr=0.01",
        "trainer.save_steps=4",
        "trainer.save_total_limit=2",
        "calibration.moderate_from=0.7",  # not the old hard-coded 0.5: merging must keep the recipe's bounds
    )
    results = run(cfg)
    return {"out": out, **results, "cfg": cfg}


def test_stage1_loss_falls_and_thresholds_are_calibrated(full_run):
    from assistant.config import AnomalyAssistantConfig

    first, last = falls(losses(full_run["out"] / "stage1"), k=8)
    assert last < first, (first, last)
    config = AnomalyAssistantConfig.from_pretrained(full_run["stage1"])
    report = json.loads((full_run["stage1"] / "calibration.json").read_text())
    assert config.image_threshold == pytest.approx(report["image_threshold"])
    assert config.suspicion_bounds == pytest.approx(
        (0.7 * config.image_threshold, config.image_threshold)
    )  # the recipe's moderate_from
    assert config.suspicion_level(config.image_threshold) == "highly"
    assert config.suspicion_level(config.image_threshold * 0.99) != "highly"


def test_stage1_expert_separates_anomalies_better_than_before_training(full_run, prepared):
    """On the training family: image AUROC on the images it trained on, pixel AUROC on held-out images."""
    from train.build import load_model
    from train.data import read_masked, split_records
    from train.scoring import auroc, score_records

    cfg = full_run["cfg"]
    records, _ = read_masked(prepared["images"])
    train, val = split_records(records, cfg.data.val_fraction, cfg.data.split_seed)
    model, processor, _ = load_model(full_run["stage1"])
    labels, scores, _, _ = score_records(model, processor, train, cfg.data.map_size)
    _, _, maps, masks = score_records(model, processor, val, cfg.data.map_size)
    image_auc = auroc(labels, scores)
    pixel_auc = auroc(masks.reshape(-1).astype(int), maps.reshape(-1))
    assert image_auc > 0.6, image_auc
    assert pixel_auc > 0.55, pixel_auc


def test_stage2_lora_loss_falls_and_adapter_is_peft_format(full_run, prepared):
    first, last = falls(losses(full_run["out"] / "stage2"))
    assert last < first - 0.05, (first, last)
    adapter = full_run["stage2"]
    assert (adapter / "adapter_model.safetensors").is_file()
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(settings["base_model_name_or_path"]) == full_run["stage1"].resolve()
    assert all(m in settings["modules_to_save"] for m in ("multi_modal_projector", "selector"))
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        lora_keys = [k for k in f.keys() if "lora_" in k]
    assert lora_keys and all("language_model" in k for k in lora_keys)  # never the vision tower


def test_checkpoints_are_complete_rotated_and_described(full_run):
    stage2 = full_run["out"] / "stage2"
    names = sorted(p.name for p in stage2.iterdir())
    assert names == ["adapter", "checkpoint-12", "checkpoint-16"], names  # last K=2 kept, no staging leftovers
    for folder in (stage2 / "checkpoint-16", full_run["stage2"], full_run["stage1"]):
        saved = (folder / "training_config.yaml").read_text()
        assert "lora:" in saved and "trainer:" in saved
        assert (folder / "git_commit.txt").read_text().strip()


def test_training_tokens_match_inference_and_labels_cover_only_answers(full_run, prepared):
    from assistant.processing import as_chat
    from train.build import load_model
    from train.data import IGNORE_INDEX, encode_conversation, read_conversations

    model, processor, _ = load_model(full_run["stage1"])
    records, _ = read_conversations(prepared["instructions"])
    record = next(r for r in records if r.label == 1 and len(r.extra["conversations"]) >= 4)
    turns = record.extra["conversations"]
    ids, labels = encode_conversation(processor, turns, (64, 64), "highly")
    question = turns[0]["value"].replace("<image>", "").strip()
    prompt = processor.render(as_chat([{"role": "user", "content": question}]))
    from PIL import Image

    inference = processor(prompt, [Image.new("RGB", (64, 64))], levels=["highly"], pixels={})["input_ids"][0].tolist()
    assert ids[: len(inference)] == inference  # the model sees at training what it will see when asked
    answered = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    expected = "".join(t["value"].strip() + "<|im_end|>" for t in turns[1::2])
    assert processor.tokenizer.decode(answered) == expected

    # the training items (tokenised once, up front) carry each record's own tokens, labels and pixels
    import torch

    from train.data import Conversations, level_for, load_rgb, where_for

    dataset = Conversations(records[:6], processor, with_levels=True)
    for index, (one, size, _, _) in enumerate(dataset.records):
        item = dataset[index]
        ids, labels = encode_conversation(
            processor, one.extra["conversations"], size, level_for(one.label), where_for(one)
        )
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        pixels = processor.image_processor([load_rgb(one.image)], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(item["pixel_values"], pixels[: len(item["pixel_values"])])
    assert len({tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset))}) > 1
    # large sets are tokenised in forked workers (expansions reused within each): the same records, ids and labels
    forked = Conversations(records[:12], processor, with_levels=True, workers=2)
    alone = Conversations(records[:12], processor, with_levels=True, workers=1)
    assert len(forked) == len(alone) == len(records[:12]) > 6
    for (r1, s1, i1, l1), (r2, s2, i2, l2) in zip(forked.records, alone.records):
        assert r1 is r2 and s1 == s2 and i1.tolist() == i2.tolist() and l1.tolist() == l2.tolist()
        assert (
            i1.tolist()
            == encode_conversation(processor, r1.extra["conversations"], s1, level_for(r1.label), where_for(r1))[0]
        )


def test_merge_answers_exactly_as_base_plus_adapter(full_run, tmp_path):
    from assistant.inference import AnomalyAssistant
    from train.merge import assistant_with_adapter, merge

    out = merge(full_run["stage2"], tmp_path / "merged")
    merged = AnomalyAssistant.from_pretrained(str(out))
    unmerged = assistant_with_adapter(full_run["stage2"])
    from PIL import Image

    def greedy_ids(assistant, image):
        # 12 tokens forced (EOS suppressed), compared as ids: a tiny model may otherwise answer "" at once
        _, visual, pixels = assistant.encode(image)
        inputs = assistant._inputs([{"role": "user", "content": "Is there a defect?"}], image, visual, pixels)
        return assistant._generate(inputs, visual, assistant._generation(12, min_new_tokens=12))[0].tolist()

    rng = np.random.default_rng(0)
    for seed in range(2):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        a, b = merged.analyze(image, max_new_tokens=12), unmerged.analyze(image, max_new_tokens=12)
        assert a.answer == b.answer
        ids = greedy_ids(merged, image)
        assert len(ids) == 12 and ids == greedy_ids(unmerged, image)
        assert a.pred_score == pytest.approx(b.pred_score, abs=1e-5) and a.pred_label == b.pred_label
    assert merged.model.config.image_threshold == pytest.approx(unmerged.model.config.image_threshold)


def test_merged_model_has_exactly_the_calibration_stage2_fitted(full_run, tmp_path):
    from assistant.calibration import Calibration, read_calibration
    from assistant.config import AnomalyAssistantConfig
    from train.merge import merge

    fitted = read_calibration(full_run["stage2"])  # stage 2 recalibrated (the selector is trained)
    assert fitted is not None and fitted.moderate_from == 0.7
    merged = Calibration.of(AnomalyAssistantConfig.from_pretrained(merge(full_run["stage2"], tmp_path / "merged")))
    assert merged == fitted
    assert merged.suspicion_bounds == pytest.approx((0.7 * merged.image_threshold, merged.image_threshold))
    assert merged.suspicion_level(0.75 * merged.image_threshold) == "moderately"


def test_bad_images_are_reported_and_skipped(prepared, capsys):
    from train.data import read_conversations, read_masked

    records, skipped = read_masked(prepared["images"])  # a missing file is simply absent from a folder listing
    assert len(skipped.problems) == 1 and "000.png" in skipped.problems[0]
    broken = str(prepared["images"] / "wood" / "train" / "good" / "000.png")
    assert broken not in {r.image for r in records}
    conversations, skipped2 = read_conversations(prepared["instructions"])  # the JSON names both
    assert len(skipped2.problems) == 2 and len(conversations) == skipped2.seen - 2
    skipped2.report("stage 2 data")
    assert "skipped 2 of" in capsys.readouterr().err


def run_cli(*args, env=None, **kwargs):
    return subprocess.Popen(
        [*args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
        **kwargs,
    )


def stage2_args(prepared, out, *extra):
    return [
        "stage2",
        str(RECIPE),
        f"output_dir={out}",
        f"model.path={prepared['base']}",
        f"data.instructions={prepared['instructions']}",
        "trainer.logging_steps=1",
        "trainer.lr=0.01",
        "trainer.batch_size=2",
        *extra,
    ]


def test_killed_run_resumes_to_the_same_losses(prepared, tmp_path):
    """SIGKILL after the first checkpoint is complete (its run info, written last, is there), resume, and compare with a
    run never interrupted."""
    steps = ["trainer.max_steps=10", "trainer.save_steps=2", "trainer.save_total_limit=3"]
    whole = run_cli(sys.executable, "-m", "train", *stage2_args(prepared, tmp_path / "whole", *steps))
    killed = run_cli(sys.executable, "-m", "train", *stage2_args(prepared, tmp_path / "killed", *steps))
    deadline = time.time() + 180
    mark = tmp_path / "killed" / "stage2" / "checkpoint-2" / "training_config.yaml"
    while not mark.is_file() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert not (tmp_path / "killed" / "stage2" / "adapter").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "train", *stage2_args(prepared, tmp_path / "killed", *steps), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume from" in resumed.stdout and "checkpoint-" in resumed.stdout
    whole.wait(timeout=240)
    assert whole.returncode == 0, whole.stdout.read()[-2000:]
    a, b = losses(tmp_path / "whole" / "stage2"), losses(tmp_path / "killed" / "stage2")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])


def test_resume_refuses_to_overwrite_without_flag(prepared, tmp_path):
    (tmp_path / "stage2" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "stage2" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "train", *stage2_args(prepared, tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "pass --resume" in done.stderr.strip().splitlines()[-1]


def test_torchrun_two_gloo_processes(prepared, tmp_path):
    process = run_cli(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "train",
        *stage2_args(prepared, tmp_path, "trainer.max_steps=3", "trainer.save_steps=3"),
    )
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    state = json.loads((tmp_path / "stage2" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (tmp_path / "stage2" / "adapter" / "adapter_model.safetensors").is_file()
    assert "rng_state_1.pth" in os.listdir(tmp_path / "stage2" / "checkpoint-3")  # the second rank ran


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu(prepared, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    process = run_cli(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29518",
        "-m",
        "train",
        *stage2_args(
            prepared,
            tmp_path,
            "trainer.max_steps=2",
            "trainer.save_steps=2",
            f"trainer.deepspeed={ROOT / 'configs/deepspeed/zero2.json'}",
        ),
        env={"DS_ACCELERATOR": "cpu"},
    )
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert (tmp_path / "stage2" / "adapter" / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_with_the_step_and_saves_nothing(prepared, tmp_path):
    import torch

    from assistant.modeling import AnomalyAssistantModel
    from train.run import run
    from train.trainer import NonFiniteLoss

    broken = tmp_path / "broken"
    shutil.copytree(prepared["base"], broken)
    model = AnomalyAssistantModel.from_pretrained(broken)
    with torch.no_grad():
        model.multi_modal_projector.linear_2.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    cfg = config(
        tmp_path / "out",
        "stage=stage2",
        f"model.path={broken}",
        f"data.instructions={prepared['instructions']}",
        "trainer.max_steps=3",
        "trainer.save_steps=1",
    )
    with pytest.raises(NonFiniteLoss, match="step 1"):
        run(cfg)
    assert not (tmp_path / "out" / "stage2").exists() or not any(
        p.name.startswith(("checkpoint", "adapter")) for p in (tmp_path / "out" / "stage2").iterdir()
    )


def test_qlora_step_on_a_4bit_language_model(prepared, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from train.build import init_model, instruction_corpus, load_model
    from train.config import ConfigError, ModelInit
    from train.run import run

    base = init_model(
        ModelInit(text_hidden=64, vocab_size=600), instruction_corpus(prepared["instructions"]), tmp_path / "base64"
    )
    model, _, _ = load_model(base, quantize=True)
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(n.startswith("language_model.") for n in quantised)
    del model
    cfg = config(
        tmp_path / "out",
        "stage=stage2",
        "quantization=4bit",
        f"model.path={base}",
        f"data.instructions={prepared['instructions']}",
        "trainer.max_steps=2",
        "trainer.save_steps=2",
    )
    result = run(cfg)
    assert all(np.isfinite(v) for v in losses(tmp_path / "out" / "stage2").values())
    assert (result["stage2"] / "adapter_model.safetensors").is_file()

    narrow = init_model(ModelInit(text_hidden=32, vocab_size=600), instruction_corpus(None), tmp_path / "base32")
    with pytest.raises(ConfigError, match="in_features >= 64"):
        load_model(narrow, quantize=True)


def test_gradient_checkpointing_gives_the_same_losses(prepared, tmp_path, monkeypatch):
    import transformers.modeling_utils

    from train.run import run

    calls = []  # transformers checkpoints each decoder layer through this module's `checkpoint`
    original = transformers.modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)

    def stage2(name, *extra):
        cfg = config(
            tmp_path / name,
            "stage=stage2",
            f"model.path={prepared['base']}",
            f"data.instructions={prepared['instructions']}",
            "trainer.max_steps=3",
            "trainer.save_steps=3",
            *extra,
        )
        run(cfg)
        return losses(tmp_path / name / "stage2")

    plain = stage2("plain")
    assert not calls
    checkpointed = stage2("gc", "trainer.gradient_checkpointing=true")
    assert calls  # the decoder layers really were checkpointed
    assert sorted(plain) == sorted(checkpointed) == [1, 2, 3]
    for step in plain:
        assert checkpointed[step] == pytest.approx(plain[step], rel=1e-4), step


def test_token_pooling_trains_what_inference_reads(prepared, tmp_path):
    from assistant import AnomalyAssistant
    from train.config import ConfigError
    from train.run import run

    def stage2(name, *extra):
        return run(
            config(
                tmp_path / name,
                "stage=stage2",
                f"model.path={prepared['base']}",
                f"data.instructions={prepared['instructions']}",
                "trainer.max_steps=2",
                "trainer.save_steps=2",
                "model.image_token_pooling=2",
                *extra,
            )
        )["stage2"]

    # LoRA keeps the base's layout, so a different pooling would train on one token count and answer on another
    with pytest.raises(ConfigError, match="image_token_pooling"):
        stage2("lora")
    trained = AnomalyAssistant.from_pretrained(str(stage2("full", "full=true")))
    base = AnomalyAssistant.from_pretrained(str(prepared["base"]))
    assert trained.model.config.image_token_pooling == 2 and base.model.config.image_token_pooling == 1
    size = (64, 64)
    assert trained.processor.num_image_tokens(size) < base.processor.num_image_tokens(size)
    from PIL import Image

    assert isinstance(
        trained.chat(
            [{"role": "user", "content": "Is it defective?"}], Image.new("RGB", size), stream=False, max_new_tokens=4
        ),
        str,
    )


def test_compiled_stage1_matches_eager_and_saves_plain_names(prepared, tmp_path, monkeypatch):
    """`stage1_compile=true` (torch.compile through the Trainer) trains the same model: same losses, and the saved
    checkpoint and resumable state use the plain parameter names (no `_orig_mod.` prefix). The polish phase is
    compiled too (it once ran eager: accelerate's "already prepared" mark reached the module through the compiled
    wrapper of the main phase)."""
    import torch
    from safetensors.torch import load_file

    from assistant import AnomalyAssistant
    from train.run import run
    from train.stage1 import TRAINABLE_FILE
    from train.trainer import last_checkpoint

    def stage1(name, *extra):
        cfg = config(
            tmp_path / name,
            "stage=stage1",
            f"model.path={prepared['base']}",
            f"data.masked={prepared['images']}",
            "stage1_steps=4",
            "trainer.save_steps=4",
            "stage1_polish.steps=2",
            *extra,
        )
        return run(cfg)["stage1"]

    compiled_modules = []
    original = torch.compile

    def counting(model=None, **kwargs):
        compiled_modules.append(type(model).__name__)
        return original(model, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    stage1("eager")
    assert not compiled_modules
    compiled = stage1("compiled", "stage1_compile=true")
    assert compiled_modules == ["ExpertObjective", "ExpertObjective"]  # the main phase and the polish
    for phase, steps in (("stage1", [1, 2, 3, 4]), ("stage1/polish", [1, 2])):
        a, b = losses(tmp_path / "eager" / phase), losses(tmp_path / "compiled" / phase)
        assert sorted(a) == sorted(b) == steps, phase
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=2e-3), (phase, step)
    saved = load_file(str(Path(last_checkpoint(tmp_path / "compiled" / "stage1")) / TRAINABLE_FILE))
    assert saved and not any("_orig_mod" in key for key in saved)
    assert set(saved) == set(load_file(str(Path(last_checkpoint(tmp_path / "eager" / "stage1")) / TRAINABLE_FILE)))
    report = AnomalyAssistant.from_pretrained(str(compiled)).detect(np.zeros((64, 64, 3), dtype=np.uint8))
    assert 0.0 <= report.pred_score <= 1.0


def test_stage1_batch_size_sets_stage_one_batch_only(prepared, tmp_path):
    """`stage1_batch_size` is stage 1's batch (the Trainer's recorded batch and the images seen per step); stage 2
    keeps trainer.batch_size."""
    from train.run import run
    from train.trainer import last_checkpoint

    cfg = config(
        tmp_path,
        f"model.path={prepared['base']}",
        f"data.masked={prepared['images']}",
        f"data.instructions={prepared['instructions']}",
        "stage1_steps=2",
        "trainer.max_steps=2",
        "trainer.save_steps=2",
        "trainer.batch_size=2",
        "stage1_batch_size=3",
    )
    run(cfg)
    states = {
        stage: json.loads((Path(last_checkpoint(tmp_path / stage)) / "trainer_state.json").read_text())
        for stage in ("stage1", "stage2")
    }
    assert states["stage1"]["train_batch_size"] == 3
    assert states["stage2"]["train_batch_size"] == 2


def test_stage1_trains_a_contrast_score_head(prepared, tmp_path):
    """`model.expert.score_input=contrast` reaches the stage-1 model (its config and its scores); a bad value is a
    config error before any training."""
    from assistant import AnomalyAssistant
    from train.config import ConfigError
    from train.run import run

    common = [
        f"model.path={prepared['base']}",
        f"data.masked={prepared['images']}",
        f"data.instructions={prepared['instructions']}",
        "stage=stage1",
        "stage1_steps=2",
        "trainer.save_steps=2",
    ]
    with pytest.raises(ConfigError, match="model.expert: expert score_input must be one of"):
        config(tmp_path / "bad", *common, "model.expert.score_input=difference")
    results = run(config(tmp_path / "ok", *common, "model.expert.score_input=contrast"))
    model = AnomalyAssistant.from_pretrained(results["stage1"])
    assert model.model.expert.config.score_input == "contrast"
    image = sorted((prepared["images"] / "wood" / "test").rglob("*.png"))[0]
    assert 0.0 <= model.detect(image).pred_score <= 1.0


def test_stage1_weight_average_is_saved_and_survives_a_resume(prepared, tmp_path):
    """`stage1_ema`: the stage-1 model holds the moving average of the trained weights (not the last ones), each
    checkpoint carries the average, and a run resumed from a mid-run checkpoint ends with the same average."""
    from safetensors.torch import load_file

    from train.config import ConfigError
    from train.run import run
    from train.stage1 import AVERAGE_FILE, TRAINABLE_FILE

    common = [
        f"model.path={prepared['base']}",
        f"data.masked={prepared['images']}",
        "stage=stage1",
        "stage1_steps=8",
        "trainer.save_steps=4",
        "trainer.save_total_limit=2",
        "stage1_ema=0.9",
        "trainer.lr=0.01",
    ]
    with pytest.raises(ConfigError, match="stage1_ema"):
        config(tmp_path / "bad", *common, "stage1_ema=1.0")
    whole = run(config(tmp_path / "whole", *common))["stage1"]
    last = tmp_path / "whole" / "stage1" / "checkpoint-8"
    raw, average = load_file(str(last / TRAINABLE_FILE)), load_file(str(last / AVERAGE_FILE))
    saved = load_file(str(whole / "model.safetensors"))
    assert average.pop("__updates__").item() == 8
    moved = [name for name in raw if not np.allclose(raw[name].numpy(), average[name].numpy())]
    assert len(moved) > len(raw) // 2  # the average is not the last weights
    assert set(average) <= set(saved), sorted(set(average) - set(saved))[:3]
    for name, value in average.items():
        assert np.array_equal(saved[name].numpy(), value.numpy()), name

    shutil.copytree(tmp_path / "whole" / "stage1" / "checkpoint-4", tmp_path / "resumed" / "stage1" / "checkpoint-4")
    resumed = run(config(tmp_path / "resumed", *common, "resume=true"))["stage1"]
    again = load_file(str(resumed / "model.safetensors"))
    for name, value in average.items():
        assert np.allclose(again[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6), name
    (tmp_path / "old" / "stage1").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "stage1" / "checkpoint-4", tmp_path / "old" / "stage1" / "checkpoint-4")
    (tmp_path / "old" / "stage1" / "checkpoint-4" / AVERAGE_FILE).unlink()
    with pytest.raises(ConfigError, match="no weight average"):  # the train command: one line, exit 2
        run(config(tmp_path / "old", *common, "resume=true"))


def test_stage1_polish_is_a_second_phase_that_ends_stage_one_and_resumes(prepared, tmp_path, monkeypatch):
    """`stage1_polish`: after the main phase, a second phase with its own schedule (its checkpoints in stage1/polish)
    trains on; the stage-1 model holds the polished weights, and a run killed in the polish resumes there (the
    main phase is not run again) and ends with the same weights. Bad settings are config errors."""
    from safetensors.torch import load_file

    from train.config import ConfigError
    from train.run import run
    from train.stage1 import TRAINABLE_FILE

    common = [
        f"model.path={prepared['base']}",
        f"data.masked={prepared['images']}",
        "stage=stage1",
        "stage1_steps=4",
        "trainer.save_steps=2",
        "trainer.save_total_limit=2",
        "trainer.lr=0.01",
        "stage1_polish.steps=4",
        "stage1_polish.lr=0.003",
        "stage1_polish.warmup_ratio=0",
    ]
    with pytest.raises(ConfigError, match="stage1_polish needs steps"):
        config(tmp_path / "bad", *common, "stage1_polish.steps=0")
    with pytest.raises(ConfigError, match=r"stage1_polish.augment_grain must be in \[0, 0.5\], got 0.6"):
        config(tmp_path / "bad", *common, "stage1_polish.augment_grain=0.6")
    with pytest.raises(ConfigError, match="stage1_polish and stage1_ema"):
        config(tmp_path / "bad", *common, "stage1_ema=0.9")
    import train.run

    drawn = []  # the augmentation each phase trains with
    real = train.run.stage1_augment
    monkeypatch.setattr(train.run, "stage1_augment", lambda cfg, model: drawn.append(real(cfg, model)) or drawn[-1])
    whole = run(
        config(
            tmp_path / "whole",
            *common,
            "data.augment_hue=0.5",
            "data.augment_grain=0.05",
            "stage1_polish.augment_hue=0.05",
        )
    )["stage1"]
    assert [(a.hue, a.saturation, a.grain, a.flips) for a in drawn] == [(0.5, 0.0, 0.05, False), (0.05, 0.2, 0.0, True)]
    main_end = load_file(str(tmp_path / "whole" / "stage1" / "checkpoint-4" / TRAINABLE_FILE))
    polish_end = load_file(str(tmp_path / "whole" / "stage1" / "polish" / "checkpoint-4" / TRAINABLE_FILE))
    saved = load_file(str(whole / "model.safetensors"))
    moved = [n for n in main_end if not np.allclose(main_end[n].numpy(), polish_end[n].numpy())]
    assert len(moved) > len(main_end) // 2  # the polish trained on
    for name, value in polish_end.items():
        assert np.array_equal(saved[name].numpy(), value.numpy()), name
    state = json.loads((tmp_path / "whole" / "stage1" / "polish" / "checkpoint-4" / "trainer_state.json").read_text())
    rates = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert state["max_steps"] == 4 and 0.002 < max(rates) <= 0.003  # its own schedule, not the main phase's 0.01

    for part in ("checkpoint-2", "polish/checkpoint-2"):  # a main-phase checkpoint is left over from mid-run
        shutil.copytree(tmp_path / "whole" / "stage1" / part, tmp_path / "resumed" / "stage1" / part)
    resumed = run(
        config(
            tmp_path / "resumed",
            *common,
            "data.augment_hue=0.5",
            "data.augment_grain=0.05",
            "stage1_polish.augment_hue=0.05",
            "resume=true",
        )
    )["stage1"]
    assert not (tmp_path / "resumed" / "stage1" / "checkpoint-4").exists()  # the main phase did not run again
    again = load_file(str(resumed / "model.safetensors"))
    for name, value in polish_end.items():
        assert np.allclose(again[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("workers", [2, 0], ids=["cache-fill-decodes", "decoded-up-front"])
def test_images_that_do_not_decode_are_skipped_and_the_held_out_split_is_the_one_later_commands_use(
    prepared, tmp_path, capsys, workers
):
    """Stage 1 draws its split from the header-checked images and decodes each part once (the cache fill decodes the
    training part); a truncated image (a readable header, pixels cut off) is reported and left out wherever it falls.
    `train.self_reference` decodes only the held-out part and gets exactly the images stage 1 calibrated on."""
    import shutil

    from train.data import read_held_out, read_masked, split_records
    from train.run import run

    images = tmp_path / "images"
    shutil.copytree(prepared["images"], images)
    cfg = config(
        tmp_path / "run",
        f"model.path={prepared['base']}",
        f"data.masked={images}",
        "stage=stage1",
        "stage1_steps=2",
        "trainer.save_steps=2",
        "data.cache_images=true",
        f"data.cache_workers={workers}",
    )
    records, _ = read_masked(images, full_check=False)
    train, held_out = split_records(records, cfg.data.val_fraction, cfg.data.split_seed)
    truncated = [held_out[0].image, train[3].image]
    for path in truncated:
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    model = run(cfg)["stage1"]
    err = capsys.readouterr().err
    for path in truncated:
        assert f"skipped: {path}: image {Path(path).name}: unreadable image" in err
    assert "000.png" in err  # the broken header, reported as before
    calibrated = json.loads((model / "calibration.json").read_text())["n"]
    kept, skipped, found = read_held_out(images, cfg.data.val_fraction, cfg.data.split_seed)
    assert calibrated == len(kept) == len(held_out) - 1 and held_out[0].image not in {r.image for r in kept}
    assert found == len(records) and any(held_out[0].image in p for p in skipped.problems)


def test_calibrate_fits_the_folder_mode_and_the_domain_threshold_without_touching_the_weights(
    full_run, prepared, tmp_path
):
    from assistant.calibration import read_calibration
    from assistant.config import AnomalyAssistantConfig
    from train.calibrate import main

    model = full_run["stage1"]
    out = tmp_path / "calibrated"
    assert (
        main(
            [
                "--model",
                str(model),
                "--data",
                str(prepared["images"]),
                "--out",
                str(out),
                "--batch-mode",
                "--domain-margin",
                "5",
            ]
        )
        == 0
    )
    config = AnomalyAssistantConfig.from_pretrained(out)
    assert config.batch_thresholds is not None and read_calibration(out) is not None
    assert config.calibration == read_calibration(out)
    before = AnomalyAssistantConfig.from_pretrained(model)
    assert config.domain_threshold == pytest.approx(before.domain_threshold * 5 / 4)  # margin 4 → 5, same distances
    assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert main(["--model", str(model), "--data", str(prepared["images"]), "--out", str(model)]) == 2


def test_calibrate_takes_typical_score_top_at_the_quantile_asked_for(full_run, prepared, tmp_path, capsys):
    import json

    from assistant.config import AnomalyAssistantConfig
    from train.calibrate import main

    model, data = str(full_run["stage1"]), str(prepared["images"])
    out = tmp_path / "lowest"
    assert main(["--model", model, "--data", data, "--out", str(out), "--typical-quantile", "0"]) == 0
    typical = json.loads((out / "calibration.json").read_text())["zero_shot"]["typical"]
    assert AnomalyAssistantConfig.from_pretrained(out).typical_score_top == pytest.approx(
        min(typical["normal_medians"])
    )
    printed = capsys.readouterr().out  # printed with each surface's median, by name
    assert "typical_score_top" in printed and f"{typical['surfaces'][0]} {typical['normal_medians'][0]:.3f}" in printed
    bad = tmp_path / "bad"
    assert main(["--model", model, "--data", data, "--out", str(bad), "--typical-quantile", "2"]) == 2
    assert "typical_quantile must be in [0, 1], got 2.0" in capsys.readouterr().err and not bad.exists()


def test_calibrate_fits_a_checkpoint_that_reads_each_image_enlarged_too(full_run, prepared, tmp_path, capsys):
    import json

    from assistant.config import AnomalyAssistantConfig
    from train.calibrate import main

    model, data = str(full_run["stage1"]), str(prepared["images"])
    plain, zoomed = tmp_path / "plain", tmp_path / "zoomed"
    assert main(["--model", model, "--data", data, "--out", str(plain)]) == 0
    assert main(["--model", model, "--data", data, "--out", str(zoomed), "--detection-zoom", "1.5"]) == 0
    assert "each image is read 1.5 times larger too" in capsys.readouterr().out
    assert AnomalyAssistantConfig.from_pretrained(zoomed).detection_zoom == 1.5
    assert AnomalyAssistantConfig.from_pretrained(plain).detection_zoom == 1.0
    fits = [json.loads((out / "calibration.json").read_text())["zero_shot"] for out in (plain, zoomed)]
    assert fits[0]["image_auroc"] != fits[1]["image_auroc"] or fits[0]["image_threshold"] != fits[1]["image_threshold"]
    bad = tmp_path / "bad"
    assert main(["--model", model, "--data", data, "--out", str(bad), "--detection-zoom", "3"]) == 2
    assert "detection_zoom must be between 1 and 2, got 3.0" in capsys.readouterr().err and not bad.exists()


def test_calibrate_on_every_image_of_a_product_fits_its_verdicts_and_makes_it_a_known_kind(full_run, tmp_path, capsys):
    """`--all-images`: labelled images of a product the checkpoint never trained on (caps, for a model of wood) are
    all used, the checkpoint's typical level is kept, and the product's images stop being a new kind (no warning, no
    raised threshold); a folder without defective images is refused in one line and nothing is written."""
    from sklearn.metrics import balanced_accuracy_score

    from assistant.config import AnomalyAssistantConfig
    from assistant.inference import AnomalyAssistant
    from data_prep.synth import SynthPlan, write_dataset
    from train.calibrate import main
    from train.data import read_masked

    model = full_run["stage1"]
    product = tmp_path / "caps"
    write_dataset(product, SynthPlan(n=16, families=("cap",), size=64, seed=9, anomaly_ratio=0.5))
    records, _ = read_masked(product)
    images = [r.image for r in records]
    before = AnomalyAssistant.from_pretrained(str(model))
    novel = [bool(before.detect(path).warnings) for path in images]
    assert any(novel)  # the premise: to the wood model, caps are a new kind

    out = tmp_path / "for-caps"
    assert main(["--model", str(model), "--data", str(product), "--all-images", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "calibration.json").read_text())
    assert report["held_out"] == len(records) == 16 and report["images"] == "all"
    assert f"{len(records)} images' image AUROC" in printed and "typical_score_top kept from the checkpoint" in printed
    fitted = AnomalyAssistantConfig.from_pretrained(out)
    assert fitted.typical_score_top == AnomalyAssistantConfig.from_pretrained(model).typical_score_top
    after = AnomalyAssistant.from_pretrained(str(out))
    reports = [after.detect(path) for path in images]
    truth = [r.label == 1 for r in records]
    assert not any(r.warnings for r in reports)
    # judged at the fitted threshold, not the raised one for new kinds: the fit's balanced accuracy, to the image
    assert balanced_accuracy_score(truth, [r.pred_label for r in reports]) == pytest.approx(
        report["zero_shot"]["image_balanced_accuracy"]
    )
    assert report["domain_bank"]["added"] >= 1
    assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()

    # the folder mode is fitted on the scores it gives at inference, the shift of a far kind's learned scores
    # included (`Calibration.anchor_folder`): on the product's own folder its verdicts are the fit's, to the image
    source = tmp_path / "low-typical"
    shutil.copytree(model, source)
    config = json.loads((source / "config.json").read_text())
    config["typical_score_top"] = 1e-6  # every caps folder lies above it: its learned scores are shifted down
    (source / "config.json").write_text(json.dumps(config))
    folder_fit = tmp_path / "for-caps-folders"
    assert (
        main(["--model", str(source), "--data", str(product), "--all-images", "--out", str(folder_fit), "--batch-mode"])
        == 0
    )
    fit = json.loads((folder_fit / "calibration.json").read_text())["batch"]
    folder = AnomalyAssistant.from_pretrained(str(folder_fit)).detect_batch(images, zero_shot="batch")
    assert balanced_accuracy_score(truth, [r.pred_label for r in folder]) == pytest.approx(
        fit["image_balanced_accuracy"]
    )

    # image-level labels only: the defective images keep no mask; the image threshold is the same, the pixel
    # thresholds stay the checkpoint's (fitted on maps whose defect pixels would count as normal, they would fall)
    shutil.rmtree(product / "cap" / "ground_truth")
    unmasked = tmp_path / "for-caps-unmasked"
    assert main(["--model", str(model), "--data", str(product), "--all-images", "--out", str(unmasked)]) == 0
    assert "pixel thresholds kept from the checkpoint: 8 defective images have no mask" in capsys.readouterr().out
    labels_only = AnomalyAssistantConfig.from_pretrained(unmasked)
    assert labels_only.image_threshold == fitted.image_threshold
    assert labels_only.pixel_threshold == AnomalyAssistantConfig.from_pretrained(model).pixel_threshold

    wide = tmp_path / "domain"  # the domain threshold is the training surfaces': a product would widen it past use
    assert (
        main(
            ["--model", str(model), "--data", str(product), "--all-images", "--out", str(wide), "--domain-margin", "5"]
        )
        == 2
    )
    assert "does not go with --all-images" in capsys.readouterr().err and not wide.exists()

    too_few = tmp_path / "too-few"  # 8 normal caps cannot give 8 references to each image and leave one out
    assert (
        main(["--model", str(model), "--data", str(product), "--all-images", "--out", str(too_few), "--few-shot", "8"])
        == 2
    )
    assert "at least 9 normal images per category" in capsys.readouterr().err and not too_few.exists()

    normals = tmp_path / "normals-only"
    write_dataset(normals, SynthPlan(n=6, families=("cap",), size=64, seed=9, anomaly_ratio=0.0))
    refused = tmp_path / "refused"
    assert main(["--model", str(model), "--data", str(normals), "--all-images", "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no defective one" in err[-1] and "--reference" in err[-1] and not refused.exists()
