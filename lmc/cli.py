"""`lmc` on the command line. `lmc --help` lists the commands; each has its own --help."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmc.errors import LmcError

EPILOG = """examples:
  lmc demo                                      compile the built-in models, check vs PyTorch
  lmc opt model.lmc -p canonicalize,cse,dce     run passes over a text IR file, print the result
  lmc opt model.lmc -p canonicalize --dump-ir dumps/   ... and write the IR after every pass
  lmc passes                                    list the passes a pipeline may name
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args) or 0
    except LmcError as exc:
        print(f"lmc: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unwritable output or dump folder, missing file
        print(f"lmc: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmc", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="lmc, a compiler for neural networks: one printable IR from model to kernel.")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    opt = sub.add_parser("opt", help="run a pass pipeline over a .lmc file and print the IR",
                         description="Parse FILE (lmc text IR), run PIPELINE, verify after "
                         "every pass and print the resulting IR (the mlir-opt of lmc).")
    opt.add_argument("file", help="a .lmc text IR file (e.g. a dump from --dump-ir)")
    opt.add_argument("-p", "--pipeline", default="",
                     help="comma-separated passes with options in braces, e.g. "
                     "'canonicalize,cse,dce{drop_unused_weights=false}'")
    opt.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass to DIR")
    opt.add_argument("--weights", metavar="FILE", help="safetensors with the param arrays "
                     "(default: FILE.safetensors or weights.safetensors beside FILE)")
    opt.add_argument("-o", "--output", metavar="OUT", help="write the IR to OUT instead of stdout")
    opt.set_defaults(fn=cmd_opt)

    demo = sub.add_parser("demo", help="compile the built-in tiny GPT, MoE and LoRA models",
                          description="Compile the built-in models with dynamic shapes, dump "
                          "their IR, print op counts and check outputs against eager PyTorch.")
    demo.add_argument("--dump-ir", metavar="DIR", default="lmc-dumps",
                      help="where to write the IR dumps (default: ./lmc-dumps)")
    demo.set_defaults(fn=cmd_demo)

    passes = sub.add_parser("passes", help="list the registered passes and their options")
    passes.set_defaults(fn=cmd_passes)
    return p


def cmd_opt(args) -> int:
    from lmc.ir.parser import parse_file
    from lmc.ir.printer import print_module
    from lmc.pass_manager import PassManager

    module = parse_file(args.file, args.weights)
    PassManager.from_pipeline(args.pipeline, dump_ir=args.dump_ir).run(module)
    text = print_module(module)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_passes(args) -> int:
    import dataclasses

    from lmc.pass_base import PASSES, _load_passes
    _load_passes()
    for name, cls in sorted(PASSES.items()):
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:16s} {('{' + opts + '}') if opts else '':34s} {doc}")
    return 0


def cmd_demo(args) -> int:
    from lmc.demo import run_demo
    return run_demo(args.dump_ir)


if __name__ == "__main__":
    sys.exit(main())
