"""Which data parallelism a stage runs, and sharded training with PyTorch FSDP2.

Under FSDP (`torch.distributed.fsdp.fully_shard`) the fp32 weights, gradients and AdamW moments
are split across the ranks (ViT-H on 2xT4: 9.5 GiB of state per GPU under DDP, half that
sharded). The stage trains a sharded *replica* of the model + class centres (`TrainStep`):
each transformer block is one FSDP unit, the class centres another (kept in fp32: the margin
loss is fp32), and the train step the root, which takes every remaining parameter (patch
embedding, final norm, head), so every trained parameter is a DTensor and clipping and the
grad scaler see one kind of tensor. Parameters are unsharded in the stage's AMP dtype and
gradients reduced in fp32 onto fp32 master shards.

The rest of the pipeline never sees shards: `copy_full_weights` gathers the replica's weights
(one tensor at a time, every rank) into the plain model before anything reads it, i.e.
evaluation points, `select_by`, `final.pt`, the export, later stages. The optimizer state goes
into `last.pt` in torch.distributed.checkpoint's full, parameter-name-keyed form gathered onto
rank 0's CPU (`full_optimizer_state`), which any world size and parallelism loads back.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from guie.config import ExperimentConfig, StageConfig
from guie.train import dist

PARALLEL_SINGLE, PARALLEL_DDP, PARALLEL_FSDP = "single", "ddp", "fsdp"


def resolve_parallel(stage: StageConfig, world: int, from_cache: bool,
                     auto: Callable[[], str] | None = None) -> str:
    """The parallelism `stage` runs: "single" (one rank), "ddp" or "fsdp". A cached stage
    (head + class centres: megabytes of state) always runs DDP: sharding buys it nothing.
    `parallel="auto"` asks `auto()` (the loop passes `auto_parallel`; None: DDP). FSDP on a
    torch without FSDP2 falls back to DDP with a message."""
    if world <= 1:
        return PARALLEL_SINGLE
    if from_cache:
        return PARALLEL_DDP
    wanted = stage.parallel
    if wanted == "auto":
        wanted = auto() if auto is not None else PARALLEL_DDP
        dist.say(f"{stage.name}: parallel=auto -> {wanted}")
    if wanted == PARALLEL_FSDP:
        supported, why = dist.fsdp_supported()
        if not supported:
            dist.say(f"{stage.name}.parallel=fsdp: {why}; this stage trains with DDP instead")
            return PARALLEL_DDP
    return wanted


def auto_parallel(cfg: ExperimentConfig, stage: StageConfig, world: int, device: torch.device,
                  num_classes: int) -> str:
    """`parallel="auto"` by the planner's rule (`guie.plan.auto.choose_parallel`: DDP where
    it fits this GPU with headroom, else FSDP where that fits), for the memory PyTorch reports
    on this GPU. Every rank reaches the same answer. On a CPU there is no GPU memory for the
    rule to budget: DDP."""
    if device.type != "cuda":
        return PARALLEL_DDP
    from guie.plan.auto import choose_parallel  # deferred: the planner imports the trainer

    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return choose_parallel(cfg, stage, world, gib, num_classes)


def transformer_blocks(visual: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks, one FSDP unit each: an open_clip ViT's resblocks, a timm
    trunk's stages; [] for anything else (the root unit then holds the whole backbone)."""
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        return list(transformer.resblocks)
    blocks = getattr(getattr(visual, "trunk", None), "blocks", None)
    return list(blocks) if isinstance(blocks, nn.Sequential) else []


def shard_replica(plain: nn.Module, amp_dtype: torch.dtype | None,
                  device: torch.device) -> nn.Module:
    """A copy of the train step (`TrainStep`: .model, .loss_fn) sharded over all ranks. The
    copy keeps `plain` intact as the full-weight model the rest of the pipeline reads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    replica = copy.deepcopy(plain).to(device)  # whole on the device until sharded below
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    low = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(replica.model.visual):
        fully_shard(block, mesh=mesh, mp_policy=low)
    # The class centres unshard in fp32: their cosines are the margin's input.
    fully_shard(replica.loss_fn, mesh=mesh,
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                               reduce_dtype=torch.float32))
    fully_shard(replica, mesh=mesh, mp_policy=low)
    return replica


@torch.no_grad()
def copy_full_weights(sharded: nn.Module, plain: nn.Module) -> None:
    """Every rank (a collective): `sharded`'s full weights and buffers into `plain` (same
    parameter names), gathered one tensor at a time, so the transient memory is one tensor's,
    never the model's."""
    target = plain.state_dict()
    for name, value in sharded.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        target[name].copy_(full)


@torch.no_grad()
def load_full_weights(sharded: nn.Module, plain: nn.Module) -> None:
    """Every rank (a collective): `plain`'s full weights and buffers into `sharded`'s shards
    (a resumed stage loads its checkpoint into the plain model first)."""
    from torch.distributed.tensor import distribute_tensor

    source = plain.state_dict()
    for name, value in sharded.state_dict().items():
        full = source[name].to(value.device)
        if hasattr(value, "full_tensor"):
            full = distribute_tensor(full, value.device_mesh, value.placements).to_local()
            value = value.to_local()
        value.copy_(full)


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, unsharded onto rank 0's CPU (a
    collective under FSDP; other ranks get {}): ViT-H's AdamW moments (5 GB) never sit whole
    on a GPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """`full_optimizer_state`'s output into `optimizer`, whatever the world size and
    parallelism now (each FSDP rank keeps its own shard of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def sharded_grad_scaler(device: torch.device, enabled: bool):
    """A grad scaler whose inf check is agreed by all ranks: under FSDP each rank unscales only
    its shard, so one rank may see an inf its peers do not; the scales would drift apart."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type, enabled=enabled)
