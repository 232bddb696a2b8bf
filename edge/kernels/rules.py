"""Apply the schedule rules to every PrimFunc of a legalized, fused module."""

from __future__ import annotations

from . import dense
from .target import vector_lanes

_SCHEDULED = ("tirx.is_scheduled", "tir.is_scheduled")


def is_scheduled(func) -> bool:
    return any(k in func.attrs and bool(func.attrs[k]) for k in _SCHEDULED) if func.attrs else False


def schedule_module(mod, target):
    from tvm import tirx

    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        sch = schedule_func(func, target)
        if sch is not None:
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def schedule_func(func, target):
    """A scheduled copy of `func`, or None when no rule applies (it is then compiled as is)."""
    from tvm import s_tir

    for rule in (_dense_rule, _dlight_rules):
        sch = s_tir.Schedule(func)
        try:
            if rule(sch, target):
                return sch
        except Exception:  # a rule that does not fit this function: try the next one
            continue
    return None


def _dense_rule(sch, target) -> bool:
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == dense.BLOCK_NAME]
    if len(blocks) != 1:
        return False
    dense.schedule(sch, blocks[0], lanes=vector_lanes(target))
    return True


def _dlight_rules(sch, target) -> bool:
    return False
