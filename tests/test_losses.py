import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guie.config import LossConfig, StageConfig
from guie.losses import ArcFace, CosFace, class_margins_from_counts, margin_at


def naive_arcface(emb, weight, labels, num_classes, k, s, m):
    """Per-sample, per-class re-implementation in float64: the oracle."""
    total = 0.0
    for e, y in zip(emb.double(), labels.tolist(), strict=True):
        e = e / e.norm()
        logits = []
        for c in range(num_classes):
            cos = max(float(e @ (w / w.norm())) for w in weight.double()[c * k:(c + 1) * k])
            cos = min(max(cos, -1 + 1e-7), 1 - 1e-7)
            if c == y:
                theta = math.acos(cos)
                cos = math.cos(theta + m) if theta < math.pi - m else cos - m * math.sin(m)
            logits.append(s * cos)
        logits = torch.tensor(logits, dtype=torch.float64)
        total += float(-F.log_softmax(logits, 0)[y])
    return total / len(labels)


@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("margin", [0.3, 0.8])
def test_matches_naive_oracle(subcenters, margin):
    torch.manual_seed(0)
    loss_fn = ArcFace(embed_dim=16, num_classes=7, scale=30.0, margin_rad=margin,
                      subcenters=subcenters)
    emb, labels = torch.randn(12, 16), torch.randint(0, 7, (12,))
    ours = loss_fn(emb, labels).item()
    ref = naive_arcface(emb, loss_fn.weight.detach(), labels, 7, subcenters, 30.0, margin)
    assert ours == pytest.approx(ref, rel=1e-4)


def test_per_sample_margins_match_scalar():
    torch.manual_seed(1)
    loss_fn = ArcFace(8, 5, margin_rad=0.5)
    emb, labels = torch.randn(6, 8), torch.randint(0, 5, (6,))
    assert torch.allclose(loss_fn(emb, labels), loss_fn(emb, labels, torch.full((6,), 0.5)))


def test_stable_and_monotonic_near_pi():
    loss_fn = ArcFace(4, 3, margin_rad=0.5)
    with torch.no_grad():
        loss_fn.weight.copy_(torch.eye(3, 4))
    # embedding exactly opposite its class centre: theta = pi
    emb = torch.tensor([[-1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = loss_fn(emb, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    # the target logit keeps decreasing as theta grows past pi - m (no reward for moving away)
    thetas = torch.linspace(math.pi - 0.9, math.pi - 0.01, 50)
    emb = torch.stack([torch.cos(thetas), torch.sin(thetas), 0 * thetas, 0 * thetas], 1)
    target = loss_fn.logits(emb, torch.zeros(50, dtype=torch.long))[:, 0]
    assert (target[1:] <= target[:-1] + 1e-6).all()


def test_cosface_subtracts_the_margin_from_the_target_cosine():
    torch.manual_seed(2)
    loss_fn = CosFace(8, 5, scale=30.0, margin_rad=0.4)
    emb, labels = torch.randn(6, 8), torch.randint(0, 5, (6,))
    cos = loss_fn.cosine(emb)
    want = cos.scatter(1, labels.view(-1, 1), cos.gather(1, labels.view(-1, 1)) - 0.4) * 30.0
    assert torch.allclose(loss_fn.logits(emb, labels), want, atol=1e-5)


def test_class_margins_from_counts_favour_rare_classes_and_override_the_scalar():
    margins = class_margins_from_counts(np.array([1, 16, 256]), 0.2, 0.5)
    assert margins.tolist() == pytest.approx([0.5, 0.2 + 0.3 * (0.5 - 0.25) / 0.75, 0.2])
    loss_fn = ArcFace(8, 3)
    loss_fn.set_class_margins(margins)
    emb, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(loss_fn(emb, labels, 0.9), loss_fn(emb, labels, margins[labels]))


def test_margin_grows_per_epoch_up_to_the_cap():
    stage = StageConfig(margin_rad=0.3, margin_step_rad_per_epoch=0.1, margin_max_rad=0.8)
    got = [margin_at(stage, LossConfig(), e) for e in (0.0, 0.99, 1.0, 2.5, 5.0, 9.0)]
    assert got == pytest.approx([0.3, 0.3, 0.4, 0.5, 0.8, 0.8])
    assert margin_at(StageConfig(), LossConfig(margin_rad=0.35), 7.0) == 0.35


@pytest.mark.parametrize("loss_cls", [ArcFace, CosFace])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosines_logits_and_loss_are_fp32_under_autocast(loss_cls, dtype):
    """Autocast would run the centre matmul in fp16/bf16 (bf16 cosines off by up to 0.0025,
    right where ArcFace's margin acts). Under autocast the loss must equal the fp32 loss of
    the same embeddings to fp32 rounding (1e-6 relative; the low-precision matmul was off by
    ~1e-3), whether the embeddings arrive in fp32 or in the autocast dtype."""
    torch.manual_seed(3)
    loss_fn = loss_cls(embed_dim=64, num_classes=50, scale=30.0, margin_rad=0.3, subcenters=3)
    emb, labels = torch.randn(16, 64), torch.randint(0, 50, (16,))
    for given in (emb, emb.to(dtype)):
        want_logits = loss_fn.logits(given.float(), labels)
        want = loss_fn(given.float(), labels)
        given = given.detach().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            cos = loss_fn.cosine(given)
            logits = loss_fn.logits(given, labels)
            loss = loss_fn(given, labels)
        assert cos.dtype == logits.dtype == loss.dtype == torch.float32
        assert torch.allclose(logits, want_logits, rtol=1e-6, atol=1e-5)
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        loss.backward()
        assert given.grad.dtype == given.dtype  # the gradient flows back in the input's dtype
