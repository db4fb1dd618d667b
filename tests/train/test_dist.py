"""guie.train.dist outside torchrun: the FSDP2 version gate and what counts as a stalled peer."""
import pytest
import torch
import torch.distributed as torch_dist

from guie.train import dist


def test_fsdp2_is_supported_on_this_torch():
    ok, why = dist.fsdp_supported()
    assert ok, why
    assert torch.__version__ in why


@pytest.mark.parametrize("version", ["2.5.1", "2.5.0a0+git1234", "1.11.0"])
def test_fsdp2_is_refused_below_torch_2_6_with_the_reason(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    ok, why = dist.fsdp_supported()
    assert not ok
    assert f"torch {version} is older than 2.6" in why and "fully_shard" in why


@pytest.mark.parametrize("version, expected", [("2.14.1+cu130", (2, 14)), ("2.6.0", (2, 6)),
                                               ("10.0.0a0+git", (10, 0)), ("nonsense", (0, 0))])
def test_torch_version_reads_major_and_minor(monkeypatch, version, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert dist.torch_version() == expected


def test_only_a_collective_timeout_counts_as_a_stalled_peer():
    assert dist.is_collective_timeout(torch_dist.DistBackendError(
        "Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)"))
    assert not dist.is_collective_timeout(RuntimeError("DataLoader timed out after 60 seconds"))
    assert not dist.is_collective_timeout(ValueError("Timed out waiting 8000ms for recv"))


def test_outside_torchrun_init_is_one_process_and_the_helpers_are_no_ops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist.init()[:2] == (0, 1)
    assert not torch_dist.is_initialized()
    dist.barrier()
    dist.close()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)


def test_the_launcher_and_the_ranks_agree_on_the_state_folder_variable():
    from guie import launch

    assert launch.STATE_DIR_ENV == dist.STATE_DIR_ENV
