"""Co-Merge math on hand-made expert LoRAs (docs/methods/safetydpo.md)."""
import pytest
import torch

from alignment.co_merge import LoraFactors, co_merge_delta, co_merge_layer, to_lora


def lora(up, down, alpha=None) -> LoraFactors:
    up, down = torch.tensor(up, dtype=torch.float64), torch.tensor(down, dtype=torch.float64)
    return LoraFactors(down=down, up=up, alpha=float(alpha if alpha is not None else down.shape[0]))


def test_two_experts_winner_per_weight_by_hand():
    # rank-1 experts on a 2x3 layer; alpha = r so dW = B A
    e0 = lora([[1.0], [2.0]], [[1.0, 0.0, 3.0]])     # dW0 = [[1, 0, 3], [2, 0, 6]]
    e1 = lora([[2.0], [-1.0]], [[1.0, 1.0, 1.0]])    # dW1 = [[2, 2, 2], [-1, -1, -1]]
    mu0, mu1 = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.1])
    merged, winners = co_merge_delta([e0.delta(), e1.delta()], [mu0, mu1])
    # a0 = [[1, 0, 3], [2, 0, 6]], a1 = [[2, 2, 0.2], [1, 1, 0.1]]
    assert winners.tolist() == [[1, 1, 0], [0, 1, 0]]
    assert merged.tolist() == [[2.0, 2.0, 3.0], [2.0, -1.0, 6.0]]


def test_activation_scale_changes_the_winner():
    e0 = lora([[1.0]], [[1.0, 1.0]])
    e1 = lora([[2.0]], [[1.0, 1.0]])
    _, plain = co_merge_delta([e0.delta(), e1.delta()], [torch.ones(2), torch.ones(2)])
    _, scaled = co_merge_delta([e0.delta(), e1.delta()], [torch.tensor([5.0, 1.0]), torch.ones(2)])
    assert plain.tolist() == [[1, 1]] and scaled.tolist() == [[0, 1]]


def test_one_expert_returns_its_update():
    g = torch.Generator().manual_seed(0)
    e = LoraFactors(down=torch.randn(4, 10, generator=g, dtype=torch.float64),
                    up=torch.randn(8, 4, generator=g, dtype=torch.float64), alpha=8.0)
    merged = co_merge_layer([e], [torch.rand(10, generator=g, dtype=torch.float64)])
    assert merged.factors.rank == 4 and merged.relative_error < 1e-10
    assert torch.allclose(merged.factors.delta(), e.delta(), atol=1e-10)


def test_identical_experts_return_their_update():
    g = torch.Generator().manual_seed(1)
    e = LoraFactors(down=torch.randn(2, 6, generator=g, dtype=torch.float64),
                    up=torch.randn(5, 2, generator=g, dtype=torch.float64), alpha=4.0)
    mu = torch.rand(6, generator=g, dtype=torch.float64)
    merged = co_merge_layer([e, e, e], [mu, mu, mu])
    assert torch.allclose(merged.factors.delta(), e.delta(), atol=1e-10)
    assert (merged.winners == 0).all()


def test_svd_error_is_zero_at_full_rank_and_positive_below():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 4, generator=g, dtype=torch.float64)
    full, error = to_lora(delta, rank=4)
    assert error < 1e-12 and torch.allclose(full.delta(), delta, atol=1e-12)
    assert full.alpha == 4.0
    _, truncated = to_lora(delta, rank=2)
    s = torch.linalg.svdvals(delta)
    assert truncated == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-9)
    capped, _ = to_lora(delta, rank=99)
    assert capped.rank == 4


def test_mismatched_experts_are_refused():
    with pytest.raises(ValueError, match="expert 1 has an update of shape"):
        co_merge_delta([torch.zeros(2, 3), torch.zeros(3, 3)], [torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="activations have shape"):
        co_merge_delta([torch.zeros(2, 3)], [torch.ones(2)])
