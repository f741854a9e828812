"""fxlora's graph passes (installed as ``fxlora.passes``).

Each pass is a small function ``pass(gm, ...) -> torch.fx.passes.infra.pass_base.PassResult`` that
edits ``gm`` in place and reports honestly whether it changed anything, so it plugs into torch's
``PassManager``.  The public API in ``fxlora`` copies what must not be shared and runs them.
"""

from .fold import fold
from .fuse_siblings import fuse_siblings
from .rewrite import rewrite

__all__ = ["rewrite", "fold", "fuse_siblings"]
