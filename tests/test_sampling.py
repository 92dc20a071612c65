import torch

from twig_batch.engine.sampling import filter_top_k_top_p, sample_tokens
from twig_batch.engine.noise import uniform_noise
from twig_batch.seeds import derive_seed


def test_noise_is_per_row_and_reproducible():
    seeds = torch.tensor([1, 2, 3], dtype=torch.int64)
    a = uniform_noise(seeds, 5, 1000)
    assert torch.equal(a[1], uniform_noise(seeds[1:2], 5, 1000)[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, uniform_noise(seeds, 6, 1000))
    assert 0 < a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.02


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64))
    draws = [sample_tokens(logits, torch.tensor([s]), 0, 1.0).item() for s in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).double() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.03)


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    assert torch.isinf(filter_top_k_top_p(logits, 2, None)[0, 2:]).all()
    kept = ~torch.isinf(filter_top_k_top_p(logits, None, 0.7)[0])
    assert kept.tolist() == [True, True, False, False]
    assert sample_tokens(logits, torch.tensor([9]), 0, 0).item() == 0


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "a", 0) == derive_seed(0, "a", 0)
    assert len({derive_seed(0, "a", 0), derive_seed(0, "a", 1), derive_seed(1, "a", 0), derive_seed(0, "b", 0)}) == 4
    assert 0 <= derive_seed(2**70, "x" * 500, 10**9) < 2**63
