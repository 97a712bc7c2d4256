"""Method registry: the loop looks methods up by the config's `method` name, never branches on it."""

from __future__ import annotations

import importlib

from semiseg_cli.methods.base import Method

_MODULES = {
    "supervised": ("semiseg_cli.methods.supervised", "Supervised"),
    "u2pl": ("semiseg_cli.methods.u2pl", "U2PL"),
    "advsemiseg": ("semiseg_cli.methods.advsemiseg", "AdvSemiSeg"),
    "dupl": ("semiseg_cli.methods.dupl", "DuPL"),
    "cam_baseline": ("semiseg_cli.methods.cam_baseline", "CAMBaseline"),
    "fixmatch": ("semiseg_cli.methods.fixmatch", "FixMatch"),
    "unimatch": ("semiseg_cli.methods.unimatch", "UniMatch"),
    "unimatch_v2": ("semiseg_cli.methods.unimatch_v2", "UniMatchV2"),
}


def get_method(name: str) -> type[Method]:
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module), cls)


__all__ = ["Method", "get_method"]
