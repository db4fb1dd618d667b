"""TorchScript export that PyTorch 1.11 can load: the competition's stated host version.

A `torch.jit.script` of the default export (`guie.export.script`) saved by torch 2.x fails in
1.11 on two counts, both checked against a real 1.11 (tests/export/compat_runner.py):
- the archive's format version: the writer stamps each file with the highest "upgrader" version
  among the operators it serialises; `nn.GELU` records `aten::gelu` (approximate kwarg, bumped to
  10), and 1.11 reads at most version 9. Without gelu the stamp stays at 3..9 (`aten::div` is 4).
- operators 1.11 lacks: `nn.MultiheadAttention` records `_native_multi_head_attention`,
  `scaled_dot_product_attention` and `pad`; `F.interpolate` records every mode's op, including
  `_upsample_lanczos2d_aa`.

So this module rebuilds the same network from operations 1.11 has and copies the weights:
GELU through erf, attention written out with matmul + softmax on `in_proj` weights, layer norm
through `F.layer_norm`, and the resize through the very upsample op `F.interpolate` calls
(`_upsample_bicubic2d_aa` etc.), so the numbers match the eager model. The archive is saved as
torch writes it (`torch.jit.save` has no version option, and the version record is not
rewritten): the check below proves the stamp is one 1.11 reads. It loses the fused attention
kernels, so the default export stays the fast one.

fp16 weights: 1.11 has no CPU kernels for half layer norm, softmax, erf or conv, so the compat
model keeps fp16 weights in the file but computes in fp32 on CPU and in fp16 on CUDA (the CUDA
path is untested against 1.11 here: no GPU build of 1.11 runs on this kit's machines).
"""
from __future__ import annotations

import copy
import re
import zipfile
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from open_clip.transformer import (LayerNorm, LayerNormFp32, LayerScale, PatchDropout,
                                   QuickGELU, ResidualAttentionBlock, VisionTransformer)
from torch import nn

from guie.backbones import backbone_of
from guie.data.preprocess import Preprocess
from guie.errors import UserValueError
from guie.export.script import (SubmissionModel, build_submission_model, check_contract,
                                write_submission_zip)
from guie.model import EmbeddingModel, image_aspect_features

# torch 1.11's kMaxSupportedFileFormatVersion (caffe2/serialize/versions.h); checked by loading.
TORCH111_MAX_FILE_FORMAT_VERSION = 9
# Operators found in torch 2.x scripts that 1.11's registry lacks (checked with 1.11's
# torch._C._jit_get_all_schemas()). An early, clear error; loading in 1.11 is the real check.
TORCH111_MISSING_OPS = ("_native_multi_head_attention", "scaled_dot_product_attention", "pad",
                        "_upsample_lanczos2d_aa", "is_nested")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


class CompatPreprocess(Preprocess):
    """`Preprocess` itself with only the interpolation routed to the op `F.interpolate` would call.

    Built from a copy of the very module (`from_preprocess`), so its crop arithmetic, dtype
    handling and normalisation stay `Preprocess`'s own code and its own config attributes.
    """

    @classmethod
    def from_preprocess(cls, source: Preprocess) -> "CompatPreprocess":
        if source.mode not in ("bicubic", "bilinear"):
            raise UserValueError(f"export_compat: preprocess interpolation {source.mode!r} has no "
                                 "torch 1.11 path (bicubic and bilinear do)")
        compat = copy.deepcopy(source)
        compat.__class__ = cls  # adds no state: only `_interpolate` differs
        return compat

    def _interpolate(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        # Exactly what F.interpolate(size=..., align_corners=False) dispatches to in torch 2.x.
        if self.mode == "bicubic":
            if self.antialias:
                return torch._C._nn._upsample_bicubic2d_aa(x, size, False, None)
            return torch._C._nn.upsample_bicubic2d(x, size, False, None)
        if self.antialias:
            return torch._C._nn._upsample_bilinear2d_aa(x, size, False, None)
        return torch._C._nn.upsample_bilinear2d(x, size, False, None)


class CompatLayerNorm(nn.Module):
    def __init__(self, source: nn.Module):
        super().__init__()
        if isinstance(source, LayerNormFp32) or not isinstance(source, (LayerNorm, nn.LayerNorm)):
            raise UserValueError(f"export_compat: unsupported norm layer {type(source).__name__}")
        if source.weight is None or source.bias is None:
            raise UserValueError("export_compat: LayerNorm without affine weights is unsupported")
        self.normalized_shape: List[int] = list(source.normalized_shape)
        self.eps = float(source.eps)
        self.weight = _frozen(source.weight)
        self.bias = _frozen(source.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype),
                            self.bias.to(x.dtype), self.eps)


class CompatLayerScale(nn.Module):
    def __init__(self, source: LayerScale):
        super().__init__()
        self.gamma = _frozen(source.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class ErfGELU(nn.Module):
    """nn.GELU(approximate='none') written out: `aten::gelu` would stamp the file version 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))


class CompatQuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _compat_activation(source: nn.Module) -> nn.Module:
    if isinstance(source, nn.GELU) and source.approximate == "none":
        return ErfGELU()
    if isinstance(source, QuickGELU):
        return CompatQuickGELU()
    raise UserValueError(f"export_compat: unsupported activation {source!r}")


def _compat_layer_scale(source: nn.Module) -> nn.Module:
    if isinstance(source, nn.Identity):
        return nn.Identity()
    if isinstance(source, LayerScale):
        return CompatLayerScale(source)
    raise UserValueError(f"export_compat: unsupported layer scale {type(source).__name__}")


class CompatAttention(nn.Module):
    """Batch-first self-attention from nn.MultiheadAttention's weights: matmul + softmax."""

    def __init__(self, source: nn.MultiheadAttention):
        super().__init__()
        if not (source.batch_first and source._qkv_same_embed_dim) or source.in_proj_bias is None \
                or source.bias_k is not None or source.add_zero_attn:
            raise UserValueError("export_compat: only batch-first self-attention with packed, "
                                 "biased in_proj and no bias_k/bias_v/zero-attn is supported")
        self.num_heads = int(source.num_heads)
        self.head_dim = int(source.head_dim)
        self.scale = float(source.head_dim) ** -0.5
        self.in_proj_weight = _frozen(source.in_proj_weight)
        self.in_proj_bias = _frozen(source.in_proj_bias)
        self.out_proj_weight = _frozen(source.out_proj.weight)
        self.out_proj_bias = _frozen(source.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape[0], x.shape[1], x.shape[2]
        qkv = F.linear(x, self.in_proj_weight.to(x.dtype), self.in_proj_bias.to(x.dtype))
        # [B, L, 3, H, hd] -> [3, B, H, L, hd]
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(torch.matmul(q * self.scale, k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, width)
        return F.linear(out, self.out_proj_weight.to(x.dtype), self.out_proj_bias.to(x.dtype))


class CompatBlock(nn.Module):
    def __init__(self, source: nn.Module):
        super().__init__()
        if type(source) is not ResidualAttentionBlock or hasattr(source, "ln_1_kv"):
            raise UserValueError(f"export_compat: unsupported transformer block "
                                 f"{type(source).__name__} (custom / cross-attention blocks)")
        self.ln_1 = CompatLayerNorm(source.ln_1)
        self.attn = CompatAttention(source.attn)
        self.ls_1 = _compat_layer_scale(source.ls_1)
        self.ln_2 = CompatLayerNorm(source.ln_2)
        self.fc_weight = _frozen(source.mlp.c_fc.weight)
        self.fc_bias = _frozen(source.mlp.c_fc.bias)
        self.act = _compat_activation(source.mlp.gelu)
        self.proj_weight = _frozen(source.mlp.c_proj.weight)
        self.proj_bias = _frozen(source.mlp.c_proj.bias)
        self.ls_2 = _compat_layer_scale(source.ls_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        h = F.linear(self.ln_2(x), self.fc_weight.to(x.dtype), self.fc_bias.to(x.dtype))
        h = F.linear(self.act(h), self.proj_weight.to(x.dtype), self.proj_bias.to(x.dtype))
        return x + self.ls_2(h)


class CompatVisionTransformer(nn.Module):
    """open_clip's VisionTransformer forward (ViT-H-14 and the tiny config) in 1.11 ops."""

    def __init__(self, source: nn.Module):
        super().__init__()
        _check_vision_transformer(source)
        self.patch_stride: List[int] = [int(s) for s in source.conv1.stride]
        self.conv_weight = _frozen(source.conv1.weight)
        self.class_embedding = _frozen(source.class_embedding)
        self.positional_embedding = _frozen(source.positional_embedding)
        self.ln_pre = nn.Identity() if isinstance(source.ln_pre, nn.Identity) \
            else CompatLayerNorm(source.ln_pre)
        self.blocks = nn.ModuleList(CompatBlock(b) for b in source.transformer.resblocks)
        self.pool_avg = source.pool_type == "avg"
        self.final_ln_after_pool = bool(source.final_ln_after_pool)
        self.ln_post = CompatLayerNorm(source.ln_post)
        self.has_proj = source.proj is not None
        # A placeholder keeps the attribute a Tensor for TorchScript when there is no projection.
        self.proj = _frozen(source.proj if self.has_proj else torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.conv_weight.to(x.dtype), None, self.patch_stride)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.final_ln_after_pool:
            pooled = self.ln_post(self._pool(x))
        else:
            pooled = self._pool(self.ln_post(x))
        if self.has_proj:
            pooled = pooled @ self.proj.to(pooled.dtype)
        return pooled

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_avg:
            return x[:, 1:].mean(dim=1)
        return x[:, 0]


def _check_vision_transformer(visual: nn.Module) -> None:
    """Fail at export time, by name, on any VisionTransformer feature this rebuild lacks."""
    if not isinstance(visual, VisionTransformer):
        raise UserValueError(f"export_compat: backbone {type(visual).__name__} is not an open_clip "
                             "VisionTransformer (timm / ResNet towers are unsupported)")
    problems = []
    if visual.attn_pool is not None:
        problems.append("attentional_pool")
    if visual.output_tokens:
        problems.append("output_tokens")
    if visual.pool_type not in ("tok", "avg"):
        problems.append(f"pool_type={visual.pool_type!r}")
    if not isinstance(visual.patch_dropout, (nn.Identity, PatchDropout)):
        problems.append(f"patch_dropout {type(visual.patch_dropout).__name__}")
    if not visual.transformer.batch_first:
        problems.append("batch_first=False")
    conv = visual.conv1
    if conv.bias is not None or tuple(conv.kernel_size) != tuple(conv.stride) \
            or any(conv.padding) or conv.groups != 1 or any(d != 1 for d in conv.dilation):
        problems.append("patch embedding other than a bias-free stride=kernel conv")
    if problems:
        raise UserValueError(f"export_compat: unsupported VisionTransformer features: {problems}")


class CompatSubmissionModel(nn.Module):
    """`SubmissionModel` in torch 1.11 ops: images uint8/float 0..255 -> float32 [B, D], unit
    norm."""

    def __init__(self, preprocess: CompatPreprocess, visual: CompatVisionTransformer,
                 linear: nn.Linear, aspect: bool = False):
        super().__init__()
        self.preprocess = preprocess
        self.visual = visual
        self.linear_weight = _frozen(linear.weight)
        self.linear_bias = _frozen(linear.bias)
        self.aspect_features: bool = aspect

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.linear_weight.device)  # the host's device may not be ours
        x = self.preprocess(images)
        # fp16 weights compute in fp16 only on CUDA: 1.11 lacks half CPU kernels.
        dtype = self.linear_weight.dtype if x.is_cuda else torch.float32
        x = self.visual(x.to(dtype))
        if self.aspect_features:
            x = torch.cat([x, image_aspect_features(images).to(x.device, dtype)], dim=1)
        embeddings = F.linear(x, self.linear_weight.to(dtype), self.linear_bias.to(dtype)).float()
        # F.normalize(dim=-1) written out: its scripted body is fine, this just keeps it local.
        denom = embeddings.norm(2.0, [-1], True).clamp_min(1e-12).expand_as(embeddings)
        return embeddings / denom


def compat_from_submission(export: SubmissionModel) -> CompatSubmissionModel:
    """Rebuild an eager `SubmissionModel` (same weights and dtypes) from 1.11 operations."""
    children = {name for name, _ in export.named_children()}
    if children != {"preprocess", "visual", "linear"}:
        raise ValueError(f"export_compat: SubmissionModel has parts {sorted(children)}; the "
                         "compat export mirrors only preprocess, visual and linear")
    dtype = export.linear.weight.dtype
    if dtype not in (torch.float32, torch.float16):
        raise UserValueError(f"export_compat: weights in {dtype}; only float32 and float16 load in "
                             "1.11")
    compat = CompatSubmissionModel(CompatPreprocess.from_preprocess(export.preprocess),
                                   CompatVisionTransformer(export.visual), export.linear,
                                   aspect=export.aspect_features)
    return compat.eval()


def build_compat_export(model: EmbeddingModel, preprocess: Preprocess,
                        fp16_weights: bool = False) -> CompatSubmissionModel:
    """The eager export model (folded head, eval copy) rebuilt for torch 1.11; scriptable."""
    why_not = backbone_of(model.visual).supports_compat_export()
    if why_not:
        raise UserValueError(f"--compat torch1.11: {why_not}")
    return compat_from_submission(build_submission_model(model, preprocess, fp16_weights))


def archive_format_version(path: str | Path) -> int:
    """The format version a TorchScript zip declares (what 1.11 compares with its maximum)."""
    with zipfile.ZipFile(path) as zf:
        records = {name.split("/", 1)[1]: name for name in zf.namelist() if "/" in name}
        for record in (".data/version", "version"):
            if record in records:
                return int(zf.read(records[record]).decode().strip())
    raise UserValueError(f"{path}: no version record; not a TorchScript archive")


def serialized_ops(path: str | Path) -> set[str]:
    """Names called as `torch.NAME(` / `torch._C._nn.NAME(` in the archive's code."""
    with zipfile.ZipFile(path) as zf:
        code = "\n".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(".py"))
    return set(re.findall(r"\btorch\.(?:_C\._nn\.)?([A-Za-z_0-9]+)\(", code))


def check_torch111_archive(path: str | Path) -> None:
    """Static checks of a saved archive against what torch 1.11 is known to reject."""
    version = archive_format_version(path)
    if version > TORCH111_MAX_FILE_FORMAT_VERSION:
        # Private API, used only to name the culprits; absent in some future torch is fine.
        version_map = getattr(torch._C, "_get_operator_version_map", dict)()
        bumped = sorted(name for name, entries in version_map.items()
                        if any(e.bumped_at_version > TORCH111_MAX_FILE_FORMAT_VERSION
                               for e in entries))
        raise UserValueError(f"{path}: archive format version {version}, but torch 1.11 reads "
                             f"at most {TORCH111_MAX_FILE_FORMAT_VERSION}; an operator versioned "
                             f"after 1.11 was serialised (one of {bumped})")
    missing = sorted(serialized_ops(path) & set(TORCH111_MISSING_OPS))
    if missing:
        raise UserValueError(f"{path}: calls operators torch 1.11 lacks: {missing}")


def save_compat_export(export: nn.Module, path: str | Path) -> Path:
    """Script, save atomically and check the archive is one torch 1.11 accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.jit.script(export).save(str(tmp))
    try:
        check_torch111_archive(tmp)
    except ValueError:
        tmp.unlink()
        raise
    tmp.replace(path)
    return path


def export_compat_submission_zip(model: EmbeddingModel, preprocess: Preprocess,
                                 out_dir: str | Path, fp16_weights: bool = False) -> Path:
    """Like `guie.export.script.export_submission_zip`, for a torch 1.11 host."""
    out_dir = Path(out_dir)
    compat = build_compat_export(model, preprocess, fp16_weights)
    embed_dim = int(compat.linear_weight.shape[0])
    saved = save_compat_export(compat, out_dir / "saved_model.pt")
    del compat
    check_contract(torch.jit.load(str(saved)), embed_dim=embed_dim)
    return write_submission_zip(saved, out_dir / "submission.zip")
