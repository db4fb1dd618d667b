"""Resuming on another number of ranks: the global batch and the sample order are kept."""
from guie.config import StageConfig
from guie.train.stage_io import keep_global_batch, order_key_of


def _ckpt(world: int, samples_per_step: int) -> dict:
    return {"world": world, "order": {"rows": 700, "samples_per_step": samples_per_step,
                                      "epochs": 1.0, "seed": 0}}


def test_fewer_ranks_raise_grad_accum_to_keep_the_samples_per_step(capsys):
    stage = StageConfig(name="s2", batch_size=4, grad_accum=2)
    assert keep_global_batch(stage, _ckpt(2, 16), world=1).grad_accum == 4
    assert "s2: resuming a checkpoint of 16 samples per optimizer step on 1 rank(s): " \
           "grad_accum 2 -> 4" in capsys.readouterr().out
    assert keep_global_batch(stage, _ckpt(1, 16), world=2).grad_accum == 2  # already equal
    assert keep_global_batch(stage, _ckpt(4, 32), world=2).grad_accum == 4


def test_the_same_ranks_or_no_whole_grad_accum_leave_the_stage_to_the_order_check():
    stage = StageConfig(name="s2", batch_size=4, grad_accum=2)
    assert keep_global_batch(stage, None, world=2) is stage
    assert keep_global_batch(stage, _ckpt(2, 32), world=2) is stage  # the user's change
    assert keep_global_batch(stage, _ckpt(3, 12), world=2) is stage  # 12 / (4 x 2): no


def test_checkpoints_from_before_name_ranks_and_grad_accum():
    old = {"order": {"rows": 700, "batch_size": 4, "world": 2, "grad_accum": 2, "epochs": 1.0,
                     "seed": 0}}
    assert order_key_of(old) == {"rows": 700, "samples_per_step": 16, "epochs": 1.0, "seed": 0}
    assert keep_global_batch(StageConfig(batch_size=4, grad_accum=2), old, 1).grad_accum == 4
