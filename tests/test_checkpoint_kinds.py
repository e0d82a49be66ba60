"""Checkpoint kinds (c) a hub id and (d) Anomaly-OV's released expert on a LLaVA-OneVision base."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import random_image

from assistant import AnomalyAssistant
from assistant.checkpoint import ModelLoadError, convert_anomaly_ov, read_anomaly_ov_expert


def test_hub_id_resolves_through_the_hub_cache(clip_llama, tmp_path, image_file):
    """A hub id goes through huggingface_hub; here its offline cache stands in for the network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-inspector"
    shutil.copytree(clip_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "assistant",
            "ask",
            str(image_file),
            "--model",
            "acme/tiny-inspector",
            "--json",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "acme/tiny-inspector" and report["score"] is not None


# Anomaly-OV's expert layout (llava/model/anomaly_expert.py): SigLIP-so400m width 1152, 27×27 patches
ANOMALY_OV_SHAPES = {
    "positive_embedding": (1, 512),
    "negative_embedding": (1, 512),
    "pooling_layer.0.weight": (1, 729),
    "pooling_layer.0.bias": (1,),
    "class_predictor.0.weight": (512, 1152),
    "class_predictor.0.bias": (512,),
    "class_predictor.2.weight": (512, 512),
    "class_predictor.2.bias": (512,),
    **{f"siglip_adaptors.{i}.weight": (512, 1152) for i in range(4)},
    **{f"siglip_adaptors.{i}.bias": (512,) for i in range(4)},
    **{f"prompt_adaptors.{i}.weight": (512, 1024) for i in range(4)},
    **{f"prompt_adaptors.{i}.bias": (512,) for i in range(4)},
    "q_former.query_proj.weight": (512, 1152),
    "q_former.query_proj.bias": (512,),
    "q_former.key_proj.weight": (512, 1152),
    "q_former.key_proj.bias": (512,),
    "final_predictor.0.weight": (512, 1152),
    "final_predictor.0.bias": (512,),
    "final_predictor.2.weight": (1, 512),
    "final_predictor.2.bias": (1,),
}


@pytest.fixture(scope="module")
def anomaly_ov_files(tmp_path_factory):
    """A LLaVA-OneVision base whose tower has Anomaly-OV's width and patch grid, and a random expert .pth."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    from assistant.processing import CHAT_TEMPLATE
    from assistant.testing import image_processor, text_config, train_tokenizer

    root = tmp_path_factory.mktemp("anomaly-ov")
    tokenizer = train_tokenizer()
    processor = image_processor(27, max_tiles_side=1)  # 27 px tiles of 1 px patches: 729 patches, as so400m/384
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=32, num_hidden_layers=25, num_attention_heads=8, image_size=27, patch_size=1
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text_config("qwen2", len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=processor.image_grid_pinpoints,
    )
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    (root / "base" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in ANOMALY_OV_SHAPES.items()}
    torch.save(state, root / "pretrained_expert_05b.pth")
    return root / "base", root / "pretrained_expert_05b.pth"


def test_anomaly_ov_expert_loads_and_runs(anomaly_ov_files, tmp_path):
    base, expert = anomaly_ov_files
    assistant = AnomalyAssistant.from_pretrained(str(base), expert=str(expert))
    state = read_anomaly_ov_expert(expert)
    # every released tensor landed in the model, unchanged
    model_state = assistant.model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(model_state[name], tensor), name
    report = assistant.analyze(random_image(40, 30), "Is it anomalous?", max_new_tokens=4)
    assert 0.0 <= report.pred_score <= 1.0 and report.anomaly_map.shape == (40, 30)
    # 2×2 pooled tokens for each of the 2 crops follow the marker, as in Anomaly-OV
    assert assistant.processor.num_anomaly_tokens((40, 30)) == 8
    assert assistant.model.config.suspicion_bounds == (0.3, 0.7)

    out = convert_anomaly_ov(base, expert, tmp_path / "converted")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.pth"))
    converted = AnomalyAssistant.from_pretrained(str(out))
    again = converted.analyze(random_image(40, 30), "Is it anomalous?", max_new_tokens=4)
    assert again.pred_score == pytest.approx(report.pred_score, abs=1e-6)
    assert again.answer == report.answer
    with pytest.raises(ModelLoadError, match="not empty"):
        convert_anomaly_ov(base, expert, out)


def test_expert_file_that_is_not_a_state_dict(anomaly_ov_files, tmp_path):
    base, _ = anomaly_ov_files
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="cannot read the expert weights"):
        AnomalyAssistant.from_pretrained(str(base), expert=str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"positive_embedding": torch.zeros(1, 512)}, wrong)
    with pytest.raises(ModelLoadError, match="not an Anomaly-OV expert"):
        AnomalyAssistant.from_pretrained(str(base), expert=str(wrong))
