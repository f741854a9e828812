"""The ``fxlora`` command.

    fxlora report PKG.MODULE:FACTORY [--rules FILE.toml] [--format table|markdown|json|csv]
                  [--budget 1%|250000] [--meta] [--fidelity bf16 --adapter FILE.safetensors]
    fxlora paper   [--format ...]      the LoRA paper's trainable-parameter counts, recomputed
    fxlora demo    [--steps N] [--out DIR] [--no-onnx]

Exit status: 0 on success, 1 when the report is over ``--budget`` (or a demo check failed), 2 on any
bad input (module path, factory, rules file, arguments, a factory that calls ``sys.exit`` or raises
anything, ``BaseException`` subclasses included), with a one-line message and no traceback; 130 when
interrupted (Ctrl-C), with one line too.  Every error, and every warning, is one line on stderr, even
when user code raises a message of several lines.  Numeric options take ASCII digits only and are
checked before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

import fxlora
from fxlora.errors import UsageError
from fxlora.reporting import FORMATS

EXIT_OK, EXIT_OVER_BUDGET, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def one_line(text: object) -> str:
    """``text`` on one line: its non-empty lines, stripped, joined with `` | ``; control characters (an
    escape sequence in a message from user code) shown escaped, never sent to the terminal."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " | ".join(lines))


def _exit_text(e: SystemExit) -> str:
    return f"sys.exit({e.code!r})" if e.code is not None else "sys.exit()"


def _call_factory(spec: str, factory: Callable[[], Any]) -> Any:
    """Call the user's factory: anything it raises (``BaseException`` subclasses such as
    ``asyncio.CancelledError`` included) and its ``sys.exit`` become a UsageError (exit status 2); a
    KeyboardInterrupt stays one (``main`` reports it)."""
    try:
        return factory()
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        raise UsageError(f"{spec}() called {_exit_text(e)}; a factory must return a model, not exit") from None
    except BaseException as e:  # noqa: BLE001 - user code
        raise UsageError(f"{spec}() raised {type(e).__name__}: {e}") from None


def load_factory(spec: str) -> nn.Module:
    """Build the model named by ``PKG.MODULE:FACTORY`` (a callable taking no arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"model must be given as PKG.MODULE:FACTORY (e.g. fxlora.zoo:roberta_base), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(f"cannot import module {module_name!r}: {e}") from None
        raise UsageError(f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    except BaseException as e:  # noqa: BLE001 - a module that fails or exits while importing
        if isinstance(e, KeyboardInterrupt):
            raise
        what = f"called {_exit_text(e)}" if isinstance(e, SystemExit) else f"failed: {type(e).__name__}: {e}"
        raise UsageError(f"importing module {module_name!r} {what}") from None
    factory = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise UsageError(
                f"module {module_name!r} has no {attr!r}; callables there: {', '.join(names[:12]) or 'none'}"
            ) from None
    if not callable(factory):
        raise UsageError(f"{spec} is a {type(factory).__name__}, not a callable that builds a model")
    model = _call_factory(spec, factory)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def parse_budget(text: str) -> tuple[str, float]:
    """``"1%"`` -> ("percent", 1.0); ``"250000"``, ``"250_000"``, ``"250k"``, ``"2.5M"`` -> ("count", n)."""
    t = text.strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)%", t)  # ASCII digits: float() would also take '５'
    if m:
        value = float(m.group(1))
        if not 0 < value <= 100:
            raise UsageError(f"--budget percentage must be in (0, 100], got {text!r}")
        return "percent", value
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kKmMgG]?)", t)
    if not m:
        raise UsageError(f"--budget must be a parameter count (250000, 250k, 2.5M) or a percentage (1%), got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if not math.isfinite(value):
        raise UsageError(f"--budget is too large to be a parameter count, got {text!r}")
    return "count", value


_ASCII_INT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*", re.ASCII)


def _int_in(name: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type`` for an int option in ``[low, high]`` (checked when parsing, before anything runs)."""

    def parse(text: str) -> int:
        digits = text.strip()
        if not _ASCII_INT.fullmatch(digits):  # int() would also take '５' and other scripts' digits
            raise argparse.ArgumentTypeError(f"must be a whole number written with the digits 0-9, got {text!r}")
        value = int(digits.replace("_", ""), 10)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low:,} to {high:,}, got {value:,}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _cmd_report(args: argparse.Namespace) -> int:
    rules = fxlora.load_rules(args.rules) if args.rules else None
    dtype = None
    if args.fidelity is not None:
        dtype = _DTYPES.get(args.fidelity.lower())
        if dtype is None:
            raise UsageError(f"--fidelity takes one of {', '.join(sorted(_DTYPES))}, got {args.fidelity!r}")
        if rules is None or args.adapter is None:
            raise UsageError("--fidelity needs --rules and --adapter (the trained LoRA checkpoint to fold)")
        if args.meta:
            raise UsageError("--fidelity needs real weights; drop --meta")
    elif args.adapter is not None:
        raise UsageError("--adapter is only used with --fidelity")
    budget = parse_budget(args.budget) if args.budget else None
    if args.meta:
        with torch.device("meta"):
            model = load_factory(args.model)
    else:
        model = load_factory(args.model)
    if dtype is not None:
        gm = fxlora.rewrite(model, rules)
        fxlora.load_lora(gm, args.adapter)
        rep = fxlora.report(gm, fidelity=dtype)
    else:
        rep = fxlora.report(model, rules)
    print(rep.render(args.format))
    if budget is not None and rep.adapted:
        kind, value = budget
        limit = value if kind == "count" else rep.base_params * value / 100.0
        if rep.lora_params > limit:
            shown = f"{value:g}% of {rep.base_params:,} base parameters = {int(limit):,}" if kind == "percent" else f"{int(limit):,}"
            print(f"over budget: {rep.lora_params:,} LoRA parameters > budget {shown}", file=sys.stderr)
            return EXIT_OVER_BUDGET
    return EXIT_OK


def _cmd_paper(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from fxlora import zoo

    rows = []
    for name, cfg in zoo.PAPER.items():
        with torch.device("meta"):
            model = cfg.factory()
        rep = fxlora.report(model, list(cfg.rules))
        r = cfg.rules[0]
        rows.append([name, ", ".join(x.target_text for x in cfg.rules), r.r, f"{rep.lora_params:,}", f"{cfg.lora_params:,}",
                     "yes" if rep.lora_params == cfg.lora_params else "NO", cfg.note])
    fmt = "github" if args.format == "markdown" else "simple"
    print(tabulate(rows, headers=["model", "rules", "r", "LoRA params", "paper", "match", "note"], tablefmt=fmt))
    return EXIT_OK if all(row[5] == "yes" for row in rows) else EXIT_OVER_BUDGET


def _cmd_demo(args: argparse.Namespace) -> int:
    from fxlora.tools.demo import run_demo

    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a folder (it is created if missing)")

    return run_demo(steps=args.steps, out=args.out, onnx=not args.no_onnx, seed=args.seed)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as argparse does, without the usage wall
        self.exit(EXIT_USAGE, f"fxlora: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxlora",
        description="LoRA as compiler passes over torch.fx graphs.",
        epilog="Run 'fxlora COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rep = sub.add_parser("report", help="per-site and total parameter budget of a set of rules")
    rep.add_argument("model", help="PKG.MODULE:FACTORY, a callable that builds the model (e.g. fxlora.zoo:roberta_base)")
    rep.add_argument("--rules", metavar="FILE.toml", help="rules file ([[rule]] tables mirroring fxlora.Rule); "
                     "without it, every candidate site is listed")
    rep.add_argument("--format", choices=FORMATS, default="table")
    rep.add_argument("--budget", metavar="1%%|250000", help="exit 1 when the LoRA parameters exceed this")
    rep.add_argument("--meta", action="store_true", help="build the model on the meta device (no weight memory)")
    rep.add_argument("--fidelity", metavar="DTYPE", help="with --adapter: how much of each update survives "
                     "folding into DTYPE (bf16, fp16, fp32)")
    rep.add_argument("--adapter", metavar="FILE.safetensors", help="trained LoRA checkpoint, for --fidelity")
    rep.set_defaults(func=_cmd_report)

    paper = sub.add_parser("paper", help="recompute the LoRA paper's trainable-parameter counts")
    paper.add_argument("--format", choices=("table", "markdown"), default="table")
    paper.set_defaults(func=_cmd_paper)

    demo = sub.add_parser("demo", help="the whole workflow on a built-in GPT-2-style model, in under a minute")
    demo.add_argument("--steps", type=_int_in("--steps", 1, 1_000_000), default=120, help="training steps, 1 or more (default 120)")
    demo.add_argument("--out", metavar="DIR", help="keep the checkpoint and exported files here")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (needs fxlora[onnx])")
    demo.add_argument("--seed", type=_int_in("--seed", 0, 2**63 - 1), default=0, help="random seed, 0 or more")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    print(f"fxlora: warning: {category.__name__}: {one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here, with one line; --help exits 0
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line each, like the errors
        try:
            return args.func(args)
        except UsageError as e:
            message = str(e)
        except fxlora.FxLoraError as e:
            message = f"{type(e).__name__}: {e}"
        except SystemExit as e:  # user code (a model's forward, a hook) that exits
            message = f"the model's code called {_exit_text(e)}"
        except KeyboardInterrupt:
            print(f"fxlora {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # stdout closed early (| head): nothing more to say there
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that the final flush stays quiet
            message = "output closed before the report was written"
        except BaseException as e:  # noqa: BLE001 - the CLI never shows a traceback (GeneratorExit, CancelledError...)
            message = f"unexpected {type(e).__name__}: {e}"
    print(f"fxlora {args.command}: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
