"""A plan as text (the table `submit.py plan` and `push --dry-run` print) and as JSON."""
from __future__ import annotations

from guie.plan.advice import shell_words
from guie.plan.core import Plan
from guie.plan.timing import sessions_needed


def format_plan(plan: Plan) -> str:
    lines = [f"plan for `{plan.config}` on {plan.machine_shape} ({plan.accelerator}): "
             f"{plan.num_classes:,} classes, {plan.train_images:,} training images per epoch "
             f"({plan.train_images_source}); sessions of {plan.max_hours:g} h"]
    if plan.memory_limit is not None:
        lines.append(f"GPU memory limit: {plan.memory_limit.gib:g} GiB per GPU, "
                     f"{plan.memory_limit.source} [{plan.memory_limit.kind}]")
    for s in plan.stages:
        verdict = "fits" if s.fits else "DOES NOT FIT"
        lines.append(f"\n{s.name}: {verdict}: {s.gpu_memory_gib:.2f} of {s.gpu_memory_limit_gib:g}"
                     f" GiB per GPU at batch {s.batch} (checkpointing "
                     f"{'on' if s.checkpointing else 'off'}); largest batch that fits: "
                     f"{s.max_batch}" + (f" ({s.max_batch_other_checkpointing} with checkpointing "
                                         f"{'off' if s.checkpointing else 'on'})"
                                         if s.max_batch_other_checkpointing else ""))
        if s.fsdp_terms:
            lines += _two_columns(s)
        else:
            for t in s.terms:
                lines.append(f"  {t.name:34s} {t.gib:7.2f} GiB  [{t.kind}] {t.basis}")
        if s.activations_gib_other_checkpointing is not None:
            other = "activations, checkpointing " + ("off" if s.checkpointing else "on")
            lines.append(f"  {other:34s}"
                         f" {s.activations_gib_other_checkpointing:7.2f} GiB  [measured] the same "
                         "batch with the other setting")
        if s.attention:
            lines.append(f"  attention: {s.attention} [estimate]")
        lines.append(f"  time: {s.hours:.2f} h [estimate] ({s.time_basis}); {s.sessions} "
                     f"session(s) of {plan.max_hours:g} h")
        for label, epochs, hours in s.readings:
            lines.append(f"  length read as {label}: {epochs:g} epochs, {hours:.2f} h [estimate]")
        if s.fsdp_terms:
            lines.append(f"  FSDP time: {s.fsdp_hours:.2f} h [estimate] ({s.comm_basis})")
        if s.parallel:
            lines.append(f"  parallel: {s.parallel} ({s.parallel_reason})")
        if s.fix:
            lines.append(f"  fix: {shell_words(s.fix)}  ({s.fix_note})")
        elif s.fix_note:
            lines.append(f"  fix: {s.fix_note}")
    lines.append("")
    lines.append(f"training: {plan.training_hours:.1f} h in {plan.sessions} session(s) of "
                 f"{plan.max_hours:g} h; with the inference kernel "
                 f"({plan.inference_kernel_hours:.2f}"
                 f" h) {plan.quota_share:.0%} of a ~30 h weekly GPU quota [estimate]")
    for label, hours in plan.readings:
        lines.append(f"recipe length read as {label}: {hours:.1f} h of training in "
                     f"{sessions_needed([hours], plan.max_hours)} session(s) of "
                     f"{plan.max_hours:g} h [estimate]")
    lines.append(f"scoring run (the host embeds {205_000:,} test images with saved_model.pt, one "
                 f"GPU): {plan.scoring_hours:.2f} h of the 9 h limit [estimate]")
    lines.append(f"training output: {plan.output_gib:.2f} GiB at its peak, "
                 f"{plan.output_end_gib:.2f}"
                 f" GiB at the end, against the {plan.output_limit_gib:.2f} GiB (20 GB) cap: "
                 f"{'fits' if plan.output_gib <= plan.output_limit_gib else 'OVER THE CAP'} "
                 f"[counted]; submission.zip {plan.submission_zip_gib:.2f} GiB [counted]")
    lines.append(f"throughput: {plan.rate_source}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _two_columns(s) -> list[str]:
    """DDP's and FSDP's terms side by side, one row per term (the basis of the column where
    the term is its own, FSDP's where both have it and differ)."""
    ddp = {t.name: t for t in s.terms}
    fsdp = {t.name: t for t in s.fsdp_terms}
    names = list(ddp) + [n for n in fsdp if n not in ddp]
    tail = ("allocator rounding", "CUDA context + cuBLAS workspace")
    names = [n for n in names if n not in tail] + [n for n in tail if n in names]
    lines = [f"  {'per GPU':34s} {'DDP':>9s}  {'FSDP':>9s}"]
    for name in names:
        d, f = ddp.get(name), fsdp.get(name)
        shown = f if f is not None and (d is None or f.basis != d.basis) else d
        cells = [f"{t.gib:6.2f} GiB" if t is not None else f"{'-':>9s}" for t in (d, f)]
        lines.append(f"  {name:34s} {cells[0]}  {cells[1]}  [{shown.kind}] {shown.basis}")
    lines.append(f"  {'peak':34s} {s.ddp_gib:6.2f} GiB  {s.fsdp_gib:6.2f} GiB  "
                 f"(limit {s.gpu_memory_limit_gib:g})")
    if s.fsdp_eval_gib:
        lines.append(f"  FSDP at an evaluation point: {s.fsdp_eval_gib:.2f} GiB (the plain fp32 "
                     "model, parked on the CPU while training, on the device beside the shards)"
                     " [counted + estimate]")
    return lines


def plan_json(plan: Plan) -> dict:
    return {
        "config": plan.config, "machine_shape": plan.machine_shape,
        "accelerator": plan.accelerator, "num_classes": plan.num_classes,
        "train_images": plan.train_images, "max_hours": plan.max_hours,
        "stages": [{"name": s.name, "fits": s.fits, "gpu_memory_gib": round(s.gpu_memory_gib, 3),
                    "gpu_memory_limit_gib": s.gpu_memory_limit_gib,
                    "gpu_memory_limit_source": s.limit_source, "max_batch": s.max_batch,
                    "max_batch_other_checkpointing": s.max_batch_other_checkpointing,
                    "activations_gib_other_checkpointing": s.activations_gib_other_checkpointing,
                    "batch": s.batch, "checkpointing": s.checkpointing,
                    "hours": round(s.hours, 3), "cache_pass_hours": round(s.cache_pass_hours, 3),
                    "sessions": s.sessions, "attention": s.attention,
                    "fix": list(s.fix), "fix_note": s.fix_note,
                    "epoch_readings": [{"reading": label, "epochs": e, "hours": round(h, 3)}
                                       for label, e, h in s.readings],
                    "parallel": s.parallel, "parallel_reason": s.parallel_reason,
                    "ddp_gib": round(s.ddp_gib, 3),
                    "fsdp_gib": None if s.fsdp_gib is None else round(s.fsdp_gib, 3),
                    "fsdp_hours": round(s.fsdp_hours, 3),
                    "fsdp_terms": [{"name": t.name, "gib": round(t.gib, 4), "kind": t.kind,
                                    "basis": t.basis} for t in s.fsdp_terms],
                    "terms": [{"name": t.name, "gib": round(t.gib, 4), "kind": t.kind,
                               "basis": t.basis} for t in s.terms]}
                   for s in plan.stages],
        "sessions": plan.sessions, "training_hours": round(plan.training_hours, 3),
        "inference_kernel_hours": round(plan.inference_kernel_hours, 3),
        "output_gib": round(plan.output_gib, 3), "output_end_gib": round(plan.output_end_gib, 3),
        "output_limit_gib": round(plan.output_limit_gib, 3),
        "submission_zip_gib": round(plan.submission_zip_gib, 3),
        "quota_share": round(plan.quota_share, 4), "scoring_hours": round(plan.scoring_hours, 3),
        "throughput_source": plan.rate_source, "warnings": list(plan.warnings),
        "epoch_readings": [{"reading": label, "training_hours": round(h, 3)}
                           for label, h in plan.readings],
        "memory_limit": None if plan.memory_limit is None else {
            "gib": plan.memory_limit.gib, "source": plan.memory_limit.source,
            "kind": plan.memory_limit.kind},
    }
