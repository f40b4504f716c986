"""Start and probe vectors: drawn from the caller's generator, on the operator's device."""

from __future__ import annotations

import pytest
import torch

from dynlens.linalg import device_generator, gaussian_vector, rademacher_vectors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_on_the_cpu_the_vectors_are_the_generators_own_draws():
    g = torch.Generator().manual_seed(5)
    want = torch.randn(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(gaussian_vector(1000, g, torch.float64, "cpu"), want)
    signs = torch.randint(0, 2, (300, 4), generator=torch.Generator().manual_seed(6), dtype=torch.int8)
    got = rademacher_vectors(300, 4, torch.Generator().manual_seed(6), torch.float32, "cpu")
    assert torch.equal(got, signs.float() * 2 - 1)


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_generator_state_gives_the_same_vectors_and_a_new_state_new_ones(device):
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return gaussian_vector(5000, g, torch.float32, device), rademacher_vectors(5000, 3, g, torch.float32, device)

    (a1, r1), (a2, r2), (b, s) = draw(1), draw(1), draw(2)
    assert a1.device.type == device and r1.device.type == device
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    assert not torch.equal(a1, b) and not torch.equal(r1, s)
    assert set(r1.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a1.mean())) < 0.1 and abs(float(a1.std()) - 1) < 0.1


def test_the_global_random_state_is_not_touched():
    before = torch.random.get_rng_state()
    gaussian_vector(100, torch.Generator().manual_seed(0), torch.float32, "cpu")
    rademacher_vectors(100, 2, torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_draw_is_seeded_from_the_cpu_generator_and_leaves_the_cuda_state_alone():
    before = torch.cuda.get_rng_state()
    g = torch.Generator().manual_seed(3)
    draw = device_generator(g, torch.device("cuda"))
    assert draw.device.type == "cuda"
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())  # one draw taken
    assert torch.equal(before, torch.cuda.get_rng_state())
