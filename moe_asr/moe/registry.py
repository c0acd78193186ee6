"""The routers a config can name (``model.moe.router``), WeNet-style: name -> "module:Class".

A new router is one module defining a ``moe_asr.moe.router.Router`` subclass
plus one line here. A router outside this package is named by its import path,
``"package.module:Class"``, in the config itself. Classes are imported only
when asked for, so a router module may import anything below the MoE layer.
"""
from __future__ import annotations

import importlib

from moe_asr.moe.router import Router

ROUTERS: dict[str, str] = {
    "topk": "moe_asr.moe.router:TopKRouter",
}


def router_class(name: str) -> type[Router]:
    """The router class ``name`` refers to: a registered name or ``"module:Class"``; ValueError says why not."""
    path = ROUTERS.get(name, name)
    module_name, sep, attr = path.partition(":")
    if not sep:
        raise ValueError(f"unknown router {name!r}: not one of {sorted(ROUTERS)} nor a 'module:Class' path")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"router {name!r}: cannot import {path} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise ValueError(f"router {name!r}: {path} is not a subclass of moe_asr.moe.router.Router")
    return cls
