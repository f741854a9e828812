"""Helpers shared by the passes."""

from __future__ import annotations

from torch.fx import GraphModule


def finalize(gm: GraphModule) -> None:
    """Check the edited graph and regenerate ``gm``'s code (recompile last)."""
    gm.graph.lint()
    gm.recompile()
