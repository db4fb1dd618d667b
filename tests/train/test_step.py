"""The optimizer step in one process: non-finite steps are skipped and counted, a stage that
keeps skipping stops with a message, clipping leaves the norm at the threshold."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from guie.config import TINY_BACKBONE, ExperimentConfig, StageConfig
from guie.losses import build_loss
from guie.model import build_model
from guie.train import step as step_module
from guie.train.step import NonFiniteTrainingError, StageStep


def _step(stage: StageConfig) -> tuple[StageStep, list[torch.nn.Parameter]]:
    base = ExperimentConfig()
    cfg = replace(base, model=replace(base.model, backbone=TINY_BACKBONE, dropout=0.0))
    model, _ = build_model(cfg)
    loss_fn = build_loss(cfg.loss, cfg.model.embed_dim, 4)
    step = StageStep(model, loss_fn, stage, torch.device("cpu"), from_features=True,
                     total_steps=100)
    return step, step.trained


def _features(bad: bool = False) -> torch.Tensor:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    if bad:
        x[0, 0] = float("nan")
    return x


LABELS = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_a_non_finite_step_without_a_scaler_is_skipped_and_counted(amp):
    """Without a grad scaler (bf16, fp32) nothing else would stop NaN reaching the weights."""
    step, params = _step(StageConfig(name="s1", amp=amp))
    assert not step.scaler.is_enabled()
    step(0, _features(), None, LABELS, 0.3)
    before = [p.detach().clone() for p in params]
    step(1, _features(bad=True), None, LABELS, 0.3)
    assert step.skipped_steps == 1 and step.grad_norm != step.grad_norm  # NaN
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(p.grad is None for p in params)  # the bad gradient does not leak onwards
    step(2, _features(), None, LABELS, 0.3)
    assert step.skipped_steps == 1 and step.consecutive_skipped_steps == 0
    assert not all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_a_stage_that_keeps_skipping_stops_with_a_message(monkeypatch):
    monkeypatch.setattr(step_module, "MAX_CONSECUTIVE_SKIPPED_STEPS", 3)
    step, _ = _step(StageConfig(name="stage2", amp="fp16"))
    assert step.scaler.is_enabled()  # fp16 on CPU: the real GradScaler("cpu") path
    # where this head's fp16 gradients fit (at 2**16 a good step overflows too)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    step(0, _features(bad=True), None, LABELS, 0.3)
    step(1, _features(), None, LABELS, 0.3)  # a good step resets the run of skips
    step(2, _features(bad=True), None, LABELS, 0.3)
    step(3, _features(bad=True), None, LABELS, 0.3)
    with pytest.raises(NonFiniteTrainingError,
                       match=r"stage2: 3 optimizer steps in a row .* \(4 in this stage; "
                             r"amp='fp16'.*stage2.grad_clip_norm=1.0"):
        step(4, _features(bad=True), None, LABELS, 0.3)
    assert step.scaler.get_scale() == 2.0**7 / 2**4  # halved at every skip
    state = step.state_dict()
    assert (state["skipped_steps"], state["consecutive_skipped_steps"]) == (4, 3)


def test_clipping_leaves_the_global_norm_at_the_threshold():
    step, params = _step(StageConfig(name="s1", grad_clip_norm=1e-3, amp="off"))
    seen = []
    real_step = step.optimizer.step

    def spy(*args, **kwargs):
        seen.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params])).item())
        return real_step(*args, **kwargs)
    step.optimizer.step = spy
    step(0, _features(), None, LABELS, 0.3)
    assert step.grad_norm > 1e-3 and seen == [pytest.approx(1e-3, rel=1e-4)]
