"""The expert's zero-shot self-reference map (`ExpertConfig.self_weight`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from assistant.expert import ExpertConfig, self_distance


def test_self_distance_singles_out_the_patch_that_does_not_repeat():
    torch.manual_seed(0)
    side, dim = 8, 32
    motifs = torch.randn(2, dim)  # a checkerboard texture: two motifs that repeat everywhere
    features = torch.stack([motifs[(r + c) % 2] for r in range(side) for c in range(side)])[None]
    features = features + 0.02 * torch.randn_like(features)
    features[0, 27] = torch.randn(dim)  # one patch that appears nowhere else
    distance = self_distance(features)[0]
    assert int(distance.argmax()) == 27
    assert float(distance[27]) > 0.25
    assert float(torch.cat([distance[:27], distance[28:]]).max()) < 0.05


def test_self_distance_ignores_the_neighbourhood():
    # a defect that spans two adjacent patches is still unique: its twin next door does not count
    side, dim = 6, 16
    torch.manual_seed(1)
    features = torch.randn(1, dim).expand(side * side, dim).clone()[None] + 0.01 * torch.randn(1, side * side, dim)
    odd = torch.randn(dim)
    features[0, 14], features[0, 15] = odd, odd
    distance = self_distance(features)[0]
    assert set(distance.topk(2).indices.tolist()) == {14, 15}


@pytest.mark.parametrize("values", [{"self_weight": 1.5}, {"self_weight": -0.1}, {"self_level": 7}, {"self_k": 0}])
def test_bad_self_reference_settings_are_rejected(values):
    with pytest.raises(ValueError, match="self_"):
        ExpertConfig(feature_layers=[1, 2], **values)


def test_self_reference_changes_the_map_and_survives_save_and_load(tmp_path):
    from assistant import AnomalyAssistant
    from assistant.testing import tiny_assistant, tiny_config

    base = tiny_config()
    expert = {**base.expert_config, "self_weight": 0.5, "self_k": 2}
    with_self = tiny_assistant(tmp_path / "self", expert_config=expert)
    without = tiny_assistant(tmp_path / "plain", expert_config=base.expert_config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    first = AnomalyAssistant.from_pretrained(with_self).detect(image)
    again = AnomalyAssistant.from_pretrained(with_self).detect(image)
    plain = AnomalyAssistant.from_pretrained(without).detect(image)
    np.testing.assert_array_equal(first.anomaly_map, again.anomaly_map)
    assert first.pred_score == again.pred_score
    assert not np.allclose(first.anomaly_map, plain.anomaly_map)
    # the score head reads the learned map it was trained on: adding the self-reference moves the map, not the score
    assert first.pred_score == pytest.approx(plain.pred_score, abs=1e-6)
