"""The named losses (adaptive_depth.losses) and objectives (adaptive_depth.objectives): each against an
independent computation."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from adaptive_depth import AdaptiveEncoder, CrossLayerInfoNCE, LossTerms, losses, objectives
from adaptive_depth.objectives import (BudgetPenalty, DistillExits, LabelExits, LastHead, SkipReward, WeightedExits,
                                       exit_objective, gate_objective, objective_spec)
from tests.conftest import padded_batch, tiny_model


def test_loss_terms_total_is_the_sum_in_order_and_rejects_non_scalars() -> None:
    terms = LossTerms({"a": torch.tensor(1.0), "b": torch.tensor(2.5)})
    assert float(terms.total) == 3.5 and terms.scalars() == {"a": 1.0, "b": 2.5, "total": 3.5}
    with pytest.raises(ValueError, match="must be a scalar"):
        LossTerms({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="at least one term"):
        LossTerms({})


def test_skip_reward_is_lambda_over_the_sum_of_gates() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 1.0, 1.0]])
    expected = (0.04 / (1.0 + 1e-6) + 0.04 / (3.0 + 1e-6)) / 2
    assert float(losses.skip_reward(probs, 0.04)) == pytest.approx(expected)


def test_budget_penalty_against_a_hand_computed_value() -> None:
    probs = torch.tensor([[0.0, 1.0], [0.5, 0.5]])  # rows run 0.5 and 0.5 of the layers
    assert float(losses.budget_penalty(probs, 0.25, weight=2.0)) == pytest.approx(2.0 * 0.25 ** 2)
    assert losses.expected_relative_cost(probs).tolist() == pytest.approx([0.5, 0.5])
    assert float(BudgetPenalty(0.25, 2.0)(probs)) == pytest.approx(2.0 * 0.25 ** 2)


@torch.no_grad()  # values only
def test_smartbert_stage1_terms_match_an_independent_computation() -> None:
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2, gate_inner_size=16, head_inner_size=16)
    contrast = CrossLayerInfoNCE(32, 8, temperature=0.5)
    input_ids, mask = padded_batch(batch_size=4)
    labels = torch.tensor([0, 1, 1, 0])
    out = encoder(input_ids, mask, gate_mode="soft", heads="last")
    terms = losses.smartbert_stage1_loss(out, labels, SkipReward(0.04), contrast, eta=0.01)
    assert list(terms) == ["task", "skip_reward", "contrastive"]
    assert float(terms["task"]) == pytest.approx(float(F.cross_entropy(out.logits, labels)))
    assert float(terms["skip_reward"]) == pytest.approx(float((0.04 / out.gate_probs.sum(-1)).mean()), rel=1e-5)
    assert float(terms["contrastive"]) == pytest.approx(0.01 * float(contrast(out.hidden_states[1:], mask).loss))
    budget = losses.smartbert_stage1_loss(out, labels, BudgetPenalty(target_cost=0.5, weight=1.0))
    assert list(budget) == ["task", "budget"]
    assert float(budget["budget"]) == pytest.approx(float(((1 - out.gate_probs).mean() - 0.5) ** 2), rel=1e-5)
    assert list(losses.smartbert_stage1_loss(out, labels, None, contrast, eta=0.0)) == ["task"]  # warm-up, eta 0


@torch.no_grad()  # values only
def test_smartbert_stage2_sums_the_intermediate_heads() -> None:
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=3), num_labels=2, gate_inner_size=16, head_inner_size=16)
    input_ids, mask = padded_batch(batch_size=4)
    labels = torch.tensor([0, 1, 1, 0])
    out = encoder(input_ids, mask, gate_mode="hard", heads=LabelExits.heads, return_head_token_states=True)
    terms = losses.smartbert_stage2_loss(out, labels, LabelExits())
    expected = sum(float(F.cross_entropy(out.exit_logits[step], labels)) for step in range(2))
    assert list(terms) == ["exit_heads"] and float(terms.total) == pytest.approx(expected)
    contrast = CrossLayerInfoNCE(16, 8, temperature=0.55)
    with_contrast = losses.smartbert_stage2_loss(out, labels, LabelExits(), contrast, eta=0.05)
    states = [out.head_token_states[step] for step in range(2)]
    assert list(with_contrast) == ["exit_heads", "contrastive"]
    assert float(with_contrast["contrastive"]) == pytest.approx(0.05 * float(contrast(states, mask).loss), rel=1e-6)


def test_smartbert_stage2_distill_matches_the_frozen_last_head() -> None:
    """``DistillExits``: FastBERT's KL of heads 1..L-1 towards the last head, labels unused,
    and no gradient reaches the teacher."""
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=3), num_labels=2, gate_inner_size=16, head_inner_size=16)
    input_ids, mask = padded_batch(batch_size=4)
    out = encoder(input_ids, mask, gate_mode="hard", heads=DistillExits.heads, return_head_token_states=True)
    terms = losses.smartbert_stage2_loss(out, torch.tensor([0, 1, 1, 0]), DistillExits())
    flipped = losses.smartbert_stage2_loss(out, torch.tensor([1, 0, 0, 1]), DistillExits())
    teacher = out.logits.detach().log_softmax(-1)
    expected = sum(F.kl_div(out.exit_logits[step].log_softmax(-1), teacher, reduction="batchmean",
                            log_target=True).item() for step in range(2))
    assert list(terms) == ["distillation"] and terms.total.item() == pytest.approx(expected, rel=1e-5)
    assert flipped.total.item() == pytest.approx(terms.total.item())
    terms.total.backward()
    assert all(parameter.grad is None for parameter in encoder.exit_heads[-1].parameters())
    assert any(parameter.grad is not None for parameter in encoder.exit_heads[0].parameters())
    intermediate_only = encoder(input_ids, mask, gate_mode="hard", heads="intermediate")
    with pytest.raises(ValueError, match="exit head 3 did not run"):
        DistillExits()(intermediate_only.exit_logits, torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize(("spec", "expected"), [
    ("skip_reward", SkipReward(0.04)),
    ({"name": "skip_reward", "weight": 0.5}, SkipReward(0.5)),
    ({"name": "budget", "target_cost": 0.4}, BudgetPenalty(0.4, 2.0)),
])
def test_gate_objectives_from_a_spec_and_back(spec, expected) -> None:
    built = gate_objective(spec)
    assert built == expected and gate_objective(objective_spec(built)) == built


@pytest.mark.parametrize(("spec", "message"), [
    ("sloth", "unknown gate objective 'sloth'; known: budget, skip_reward"),
    ({"name": "budget", "spread": 0.2}, "takes no option 'spread'"),
    ({"name": "budget", "target_cost": 1.5}, r"target_cost must be in \[0, 1\]"),
    ({"name": "skip_reward", "weight": -1}, "weight must be >= 0"),
    ({"name": "skip_reward", "weight": float("nan")}, "weight must be >= 0"),
    ({"name": "skip_reward", "weight": "big"}, "must be a number"),
    ({"weight": 1.0}, "unknown gate objective None"),
])
def test_gate_objective_refuses_bad_specs(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        gate_objective(spec)


def test_exit_objectives_by_name_and_what_they_run() -> None:
    assert [exit_objective(name) for name in ("last_head", "labels", "distill", "weighted")] == [
        LastHead(), LabelExits(), DistillExits(), WeightedExits()]
    assert [cls.heads for cls in (LastHead, LabelExits, DistillExits, WeightedExits)] == [
        "last", "intermediate", "all", "all"]
    with pytest.raises(ValueError, match="unknown exit objective 'highway'"):
        exit_objective("highway")
    with pytest.raises(ValueError, match="takes no option 'weight'"):
        exit_objective({"name": "labels", "weight": 1.0})
    assert sorted(objectives.EXIT_OBJECTIVES) == ["distill", "labels", "last_head", "weighted"]


def test_task_loss_is_mse_for_one_output() -> None:
    logits, scores = torch.tensor([[0.5], [2.0]]), torch.tensor([1.0, 1.0])
    assert float(losses.task_loss(logits, scores)) == pytest.approx((0.25 + 1.0) / 2)
    assert float(LastHead()([logits], scores)) == pytest.approx((0.25 + 1.0) / 2)


@pytest.mark.usefixtures("one_thread")
def test_budget_objective_drives_the_mean_gate_towards_its_target() -> None:
    """Gates trained on the budget penalty alone settle where the batch runs the target share of layers."""
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=4), num_labels=2, gate_inner_size=16, head_inner_size=16,
                              initial_skip_bias=-3.0)  # start with every layer running (expected cost ~0.95)
    optimizer = torch.optim.Adam(encoder.gates.parameters(), lr=0.05)
    input_ids, mask = padded_batch(batch_size=8, num_tokens=9)
    for _ in range(150):
        out = encoder(input_ids, mask, gate_mode="soft", heads="none")
        loss = losses.budget_penalty(out.gate_probs, target_cost=0.4, weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs = encoder(input_ids, mask, gate_mode="soft", heads="none").gate_probs
    assert float((1 - probs).mean()) == pytest.approx(0.4, abs=0.02)


def test_distillation_loss_zero_for_identical_and_positive_otherwise() -> None:
    teacher = torch.tensor([[2.0, -1.0], [0.3, 0.1]])
    assert float(losses.distillation_loss([teacher.clone(), teacher.clone()], teacher)) == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    loss = losses.distillation_loss([student], teacher)
    assert float(loss.detach()) > 0
    p_teacher = teacher.softmax(-1)
    expected = (p_teacher * (p_teacher.log() - student.log_softmax(-1))).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # Teacher detached: the gradient reaches the student only.
    teacher_param = teacher.clone().requires_grad_(True)
    losses.distillation_loss([student], teacher_param).backward()
    assert teacher_param.grad is None and student.grad is not None
    # The FastBERT stage-2 loss uses heads 1..L-1 as students and the last head as teacher.
    stage2 = DistillExits()([student, teacher], torch.zeros(2, dtype=torch.long))
    assert float(stage2.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_pabee_weighted_loss_matches_formula() -> None:
    values = [torch.tensor(0.9), torch.tensor(0.6), torch.tensor(0.3)]
    assert float(losses.weighted_layer_sum(values)) == pytest.approx((1 * 0.9 + 2 * 0.6 + 3 * 0.3) / 6)
    logits = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    labels = torch.tensor([0])
    ce = [float(torch.nn.functional.cross_entropy(z, labels)) for z in logits]
    assert float(WeightedExits()(logits, labels)) == pytest.approx((ce[0] + 2 * ce[1] + 3 * ce[2]) / 6)
    assert float(LabelExits()(logits, labels)) == pytest.approx(ce[0] + ce[1])
    assert float(LastHead()(logits, labels)) == pytest.approx(ce[2])
