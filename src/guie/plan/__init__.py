"""Before a Kaggle run: does each stage fit the machine, how long does it take, what does it cost.

`plan_run(cfg, machine_shape, num_classes=...) -> Plan` and `format_plan(plan) -> str`
(`plan_json(plan) -> dict` for --json). Modules: `probe` (activation memory and FLOPs measured on
the CPU), `measurements` (their cache), `gpus` (per-GPU estimates), `memory`, `timing`, `advice`
(the override that makes a stage fit), `core` (one stage), `run` (every stage), `parallel`
(DDP and FSDP per GPU), `auto` (`parallel="auto"` resolved), `gate`, `report`.
"""
from guie.plan.core import Plan, StagePlan
from guie.plan.run import plan_run
from guie.plan.report import format_plan, plan_json

__all__ = ["Plan", "StagePlan", "format_plan", "plan_json", "plan_run"]
