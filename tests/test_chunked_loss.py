"""The training loss without full logits (`assistant.loss`): the same loss and gradients as the stock head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from assistant.loss import linear_cross_entropy


def _labels(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, : length // 2] = -100  # a prompt: not supervised
    labels[1, -3:] = -100  # padding
    return labels


@pytest.mark.parametrize("chunk", [1, 5, None])
@pytest.mark.parametrize("train_head", [True, False])
def test_same_loss_and_gradients_as_cross_entropy_on_full_logits(chunk, train_head):
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(train_head)
    labels = _labels(2, 12, 50)

    loss = linear_cross_entropy(hidden, head, labels, chunk=chunk)
    loss.backward()
    ours = (loss.detach(), hidden.grad.clone(), head.weight.grad.clone() if train_head else None)
    hidden.grad, head.weight.grad = None, None

    logits = head(hidden).float()
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(ours[0], reference.detach())
    torch.testing.assert_close(ours[1], hidden.grad)
    if train_head:
        torch.testing.assert_close(ours[2], head.weight.grad)
    else:
        assert head.weight.grad is None


def test_num_items_in_batch_divides_the_sum_and_empty_supervision_is_zero():
    torch.manual_seed(1)
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    head = torch.nn.Linear(16, 30, bias=False)
    labels = _labels(2, 8, 30)
    summed = F.cross_entropy(
        head(hidden)[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(linear_cross_entropy(hidden, head, labels, num_items_in_batch=7), summed.detach() / 7)
    nothing = linear_cross_entropy(hidden, head, torch.full((2, 8), -100))
    nothing.backward()
    assert nothing.item() == 0.0 and hidden.grad.abs().sum() == 0
    # the head still gets a (zero) gradient: data-parallel ranks must all reduce the same parameters
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_model_training_forward_matches_the_stock_path(tmp_path, text):
    from assistant.modeling import AnomalyAssistantModel
    from assistant.testing import tiny_config

    torch.manual_seed(0)
    model = AnomalyAssistantModel(tiny_config("clip", text, expert=False)).train()
    ids = torch.randint(10, 300, (2, 20))
    labels = ids.clone()
    labels[:, :8] = -100
    results = {}
    for chunked in (True, False):
        model.chunked_loss = chunked
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunked] = (out.loss.detach(), grads, out.logits)
    assert results[True][2] is None and results[False][2] is not None  # the chunked path keeps no logits
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, msg=name, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation keeps the stock path and its logits
        assert model(input_ids=ids, labels=labels).logits is not None


def test_a_second_backward_is_refused_not_silently_wrong():
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.nn.Linear(8, 20, bias=False), torch.randint(0, 20, (1, 6)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
