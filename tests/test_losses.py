"""The named losses (adaptive_depth.losses): each against an independent computation."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from adaptive_depth import AdaptiveEncoder, CrossLayerInfoNCE, LossTerms, losses
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
    probs = torch.tensor([[0.0, 1.0], [0.5, 0.5]])  # rows run 0.5 and 0.5 of the layers (equal costs)
    assert float(losses.budget_penalty(probs, 0.25, weight=2.0)) == pytest.approx(2.0 * 0.25 ** 2)
    # Unequal layer costs: row 0 runs layer 0 (cost 3 of 4), row 1 half of each.
    assert losses.expected_relative_cost(probs, [3.0, 1.0]).tolist() == pytest.approx([0.75, 0.5])
    with pytest.raises(ValueError, match="one entry per step"):
        losses.expected_relative_cost(probs, [1.0, 2.0, 3.0])


def test_smartbert_stage1_terms_match_an_independent_computation() -> None:
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2, gate_inner_size=16, head_inner_size=16)
    contrast = CrossLayerInfoNCE(32, 8, temperature=0.5)
    input_ids, mask = padded_batch(batch_size=4)
    labels = torch.tensor([0, 1, 1, 0])
    out = encoder(input_ids, mask, gate_mode="soft", heads="last")
    terms = losses.smartbert_stage1_loss(out, labels, is_regression=False, skip_weight=0.04, contrastive=contrast,
                                         contrastive_weight=0.01)
    assert list(terms) == ["task", "skip_reward", "contrastive"]
    assert float(terms["task"].detach()) == pytest.approx(float(F.cross_entropy(out.logits, labels).detach()))
    assert float(terms["skip_reward"]) == pytest.approx(float((0.04 / out.gate_probs.sum(-1)).mean()), rel=1e-5)
    assert float(terms["contrastive"]) == pytest.approx(0.01 * float(contrast(out.hidden_states[1:], mask).loss))
    budget = losses.smartbert_stage1_loss(out, labels, is_regression=False, skip_weight=1.0, gate_objective="budget",
                                          target_cost=0.5)
    assert list(budget) == ["task", "budget"]
    assert float(budget["budget"]) == pytest.approx(float(((1 - out.gate_probs).mean() - 0.5) ** 2), rel=1e-5)
    routed = losses.smartbert_stage1_loss(out, labels, is_regression=False, skip_weight=1.0, gate_objective="budget",
                                          target_cost=0.5, difficulty_spread=0.2)
    row_losses = F.cross_entropy(out.logits, labels, reduction="none")
    expected = losses.routed_budget_penalty(out.gate_probs, row_losses, 0.5, 0.2, weight=1.0)
    assert list(routed) == ["task", "budget"] and float(routed["budget"]) == pytest.approx(float(expected), rel=1e-6)


def test_smartbert_stage2_sums_the_intermediate_heads() -> None:
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=3), num_labels=2, gate_inner_size=16, head_inner_size=16)
    input_ids, mask = padded_batch(batch_size=4)
    labels = torch.tensor([0, 1, 1, 0])
    out = encoder(input_ids, mask, gate_mode="hard", heads="intermediate", return_head_token_states=True)
    terms = losses.smartbert_stage2_loss(out, labels, is_regression=False)
    expected = sum(float(F.cross_entropy(out.exit_logits[step], labels)) for step in range(2))
    assert list(terms) == ["exit_heads"] and float(terms.total) == pytest.approx(expected)


def test_smartbert_stage2_distill_matches_the_frozen_last_head() -> None:
    """``exit_objective="distill"``: FastBERT's KL of heads 1..L-1 towards the last head, labels unused,
    and no gradient reaches the teacher."""
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=3), num_labels=2, gate_inner_size=16, head_inner_size=16)
    input_ids, mask = padded_batch(batch_size=4)
    out = encoder(input_ids, mask, gate_mode="hard", heads="all", return_head_token_states=True)
    terms = losses.smartbert_stage2_loss(out, torch.tensor([0, 1, 1, 0]), is_regression=False,
                                         exit_objective="distill")
    flipped = losses.smartbert_stage2_loss(out, torch.tensor([1, 0, 0, 1]), is_regression=False,
                                           exit_objective="distill")
    teacher = out.logits.detach().log_softmax(-1)
    expected = sum(float(F.kl_div(out.exit_logits[step].log_softmax(-1), teacher, reduction="batchmean",
                                  log_target=True)) for step in range(2))
    assert list(terms) == ["distillation"] and float(terms.total) == pytest.approx(expected, rel=1e-5)
    assert float(flipped.total) == pytest.approx(float(terms.total))
    terms.total.backward()
    assert all(parameter.grad is None for parameter in encoder.exit_heads[-1].parameters())
    assert any(parameter.grad is not None for parameter in encoder.exit_heads[0].parameters())
    with pytest.raises(ValueError, match="exit_objective must be 'paper' or 'distill'"):
        losses.smartbert_stage2_loss(out, torch.tensor([0, 1, 1, 0]), is_regression=False,
                                     exit_objective="labels")  # type: ignore[arg-type]


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


@pytest.mark.usefixtures("one_thread")
def test_budget_on_decisions_holds_what_the_hard_gates_run() -> None:
    """Hard gates whose probabilities sit under the threshold (here 0.6) meet a 50% budget in
    expectation while skipping nothing. ``budget_on="decisions"`` measures what runs: its penalty sees the gap,
    and training the gates on it (straight-through) brings the layers actually run towards the target."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    input_ids, mask = padded_batch(batch_size=8, num_tokens=9)
    results = {}
    for budget_on in ("probabilities", "decisions"):
        torch.manual_seed(0)
        encoder = AdaptiveEncoder(tiny_model("bert", num_layers=4), num_labels=2, gate_inner_size=16,
                                  head_inner_size=16)  # p_skip ~0.5: expected cost 50%, nothing skipped at 0.6
        optimizer = torch.optim.Adam(encoder.gates.parameters(), lr=0.03)
        for step in range(100):
            out = encoder(input_ids, mask, gate_mode="hard", heads="last", gate_threshold=0.6)
            terms = losses.smartbert_stage1_loss(out, labels, is_regression=False, skip_weight=1.0,
                                                 gate_objective="budget", target_cost=0.5, budget_on=budget_on)
            if step == 0:
                run = float(1 - out.gate_values.detach().mean())
                expected = float(1 - out.gate_probs.detach().mean())
                target = run if budget_on == "decisions" else expected
                assert run == 1.0 and float(terms["budget"]) == pytest.approx((target - 0.5) ** 2, rel=1e-5)
            optimizer.zero_grad()
            terms["budget"].backward()
            optimizer.step()
        with torch.no_grad():
            final = encoder(input_ids, mask, gate_mode="hard", heads="none", gate_threshold=0.6)
            results[budget_on] = float(1 - final.gate_values.mean())
    assert results["probabilities"] == 1.0  # the expected budget was met from the start: nothing learned to skip
    assert results["decisions"] == pytest.approx(0.5, abs=0.15)
    with pytest.raises(ValueError, match="budget_on must be"):
        losses.smartbert_stage1_loss(out, labels, is_regression=False, skip_weight=1.0, gate_objective="budget",
                                     budget_on="soft")  # type: ignore[arg-type]


def test_difficulty_targets_follow_the_loss_rank_and_keep_the_batch_budget() -> None:
    row_losses = torch.tensor([0.9, 0.1, 2.5, 0.4, 0.4001])
    targets = losses.difficulty_targets(row_losses, target_cost=0.5, spread=0.2)
    # Ranks 3, 0, 4, 1, 2 of 4: targets 0.3 + 0.1 * rank.
    assert targets.tolist() == pytest.approx([0.6, 0.3, 0.7, 0.4, 0.5])
    assert float(targets.mean()) == pytest.approx(0.5)
    assert losses.difficulty_targets(row_losses, 0.5, 0.0).tolist() == pytest.approx([0.5] * 5)
    assert losses.difficulty_targets(row_losses, 0.9, 0.3).max() == 1.0  # clamped
    assert losses.difficulty_targets(torch.tensor([3.0]), 0.4, 0.2).tolist() == pytest.approx([0.4])
    with pytest.raises(ValueError, match="spread must be >= 0"):
        losses.difficulty_targets(row_losses, 0.5, -0.1)
    # Against a hand computation: row 0 (easy, target 0.25) runs 0.5, row 1 (hard, target 0.75) runs 1.0.
    probs = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    penalty = losses.routed_budget_penalty(probs, torch.tensor([0.2, 1.0]), 0.5, 0.25, weight=2.0)
    assert float(penalty) == pytest.approx(2.0 * (0.25 ** 2 + 0.25 ** 2) / 2)


@pytest.mark.usefixtures("one_thread")
def test_routed_budget_gives_harder_rows_more_layers() -> None:
    """Gates trained on the per-row budget alone, with fixed row difficulties, run more layers on
    the harder rows and keep the batch mean at the target; on the batch-mean budget they have no
    reason to tell rows apart."""
    input_ids, mask = padded_batch(batch_size=8, num_tokens=20)  # lengths 20, 18, ..., 6: rows the gates can tell apart
    row_losses = torch.tensor([0.1, 2.0, 0.3, 1.5, 0.2, 1.0, 0.05, 3.0])  # the rows' (fixed) difficulty
    for spread in (0.0, 0.3):
        torch.manual_seed(0)
        encoder = AdaptiveEncoder(tiny_model("bert", num_layers=4), num_labels=2, gate_inner_size=16, head_inner_size=16,
                                  initial_skip_bias=-3.0)
        optimizer = torch.optim.Adam(encoder.gates.parameters(), lr=0.05)
        for _ in range(200):
            out = encoder(input_ids, mask, gate_mode="soft", heads="none")
            if spread:
                loss = losses.routed_budget_penalty(out.gate_probs, row_losses, 0.5, spread, weight=1.0)
            else:
                loss = losses.budget_penalty(out.gate_probs, 0.5, weight=1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            run = losses.expected_relative_cost(encoder(input_ids, mask, gate_mode="soft", heads="none").gate_probs)
        assert float(run.mean()) == pytest.approx(0.5, abs=0.03)
        if spread:
            rank = lambda values: values.argsort().argsort().float()  # noqa: E731
            assert float(torch.corrcoef(torch.stack([rank(run), rank(row_losses)]))[0, 1]) > 0.95
            assert float((run - losses.difficulty_targets(row_losses, 0.5, spread)).abs().max()) < 0.1
        else:
            assert float(run.max() - run.min()) < 0.05  # every row at the mean: one pattern


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
    stage2 = losses.fastbert_distillation_loss([student, teacher], torch.zeros(2, dtype=torch.long), False).total
    assert float(stage2.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_pabee_weighted_loss_matches_formula() -> None:
    values = [torch.tensor(0.9), torch.tensor(0.6), torch.tensor(0.3)]
    assert float(losses.weighted_layer_sum(values)) == pytest.approx((1 * 0.9 + 2 * 0.6 + 3 * 0.3) / 6)
    logits = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    labels = torch.tensor([0])
    ce = [float(torch.nn.functional.cross_entropy(z, labels)) for z in logits]
    assert float(losses.pabee_weighted_loss(logits, labels, False).total) == \
        pytest.approx((ce[0] + 2 * ce[1] + 3 * ce[2]) / 6)
    assert float(losses.deebert_highway_loss(logits, labels, False).total) == pytest.approx(ce[0] + ce[1])
