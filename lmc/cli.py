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
  lmc compile model.lmc -o model.lmca           compile text IR (+ model.lmc.safetensors) for
                                                this CPU into one artifact file
  lmc inspect model.lmca                        versions, CPU, signature, kernels, weights
  lmc run model.lmca --dim B=2 --dim T=128      run it on random inputs, print output summaries
  lmc run model.lmca --input x=x.npy --output out.npz   ... on given inputs, save the outputs
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
    _add_artifact_commands(sub)
    return p


def _add_artifact_commands(sub) -> None:
    comp = sub.add_parser("compile", help="compile a .lmc file into an artifact file",
                          description="Parse FILE (lmc text IR), run the pipeline, build the "
                          "kernels for this CPU and write one artifact file (manifest, final "
                          "IR, kernel code, weights) that `lmc run` and lmc.load read. Uses the "
                          "compile cache ($LMC_CACHE_DIR, default ~/.cache/lmc; 'off' disables).")
    comp.add_argument("file", help="a .lmc text IR file")
    comp.add_argument("-o", "--output", metavar="OUT", required=True,
                      help="the artifact to write (e.g. model.lmca)")
    comp.add_argument("--target", default="cpu", help="cpu (default) or ref")
    comp.add_argument("-p", "--pipeline", default=None,
                      help="passes to run instead of the default pipeline")
    comp.add_argument("--weights", metavar="FILE", help="safetensors with the param arrays "
                      "(default: FILE.safetensors or weights.safetensors beside FILE)")
    comp.set_defaults(fn=cmd_compile)

    run = sub.add_parser("run", help="run an artifact on given or random inputs",
                         description="Load ARTIFACT and run it once. Inputs not given with "
                         "--input are random (float: standard normal from --seed; integer: "
                         "zeros, valid indices for any table; bool: true). A symbol not bound "
                         "by --dim or by a given input is 1.")
    run.add_argument("artifact")
    run.add_argument("--input", metavar="NAME=FILE.npy", action="append", default=[],
                     help="an input array (repeatable)")
    run.add_argument("--dim", metavar="SYM=N", action="append", default=[],
                     help="the size of a symbolic dim of the random inputs (repeatable)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument("--threads", type=int, default=None, help="worker threads per kernel")
    run.add_argument("--output", metavar="OUT.npz", help="save the outputs (output0, ...)")
    run.set_defaults(fn=cmd_run)

    ins = sub.add_parser("inspect", help="print an artifact's manifest",
                         description="Check ARTIFACT's hashes and print what it holds: lmc and "
                         "LLVM versions, target CPU, signature, kernels, weights, pipeline.")
    ins.add_argument("artifact")
    ins.set_defaults(fn=cmd_inspect)


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


def cmd_compile(args) -> int:
    """Text IR (+ weights) → lmc.compile → one artifact file."""
    import zipfile

    import lmc
    from lmc.artifact import read
    from lmc.ir.parser import parse_file

    if zipfile.is_zipfile(args.file):
        raise LmcError(f"{args.file} is an lmc artifact already: run it with `lmc run "
                       f"{args.file}` or look inside with `lmc inspect {args.file}`")
    module = parse_file(args.file, args.weights)
    cm = lmc.compile(module, target=args.target, pipeline=args.pipeline)
    path = cm.save(args.output)
    kernels = len(read(path).manifest["kernels"])
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB, target {args.target}, "
          f"{kernels} kernels{', from the compile cache' if cm.cache_hit else ''})")
    return 0


def cmd_run(args) -> int:
    """Load an artifact, run it once on given/random inputs, print one line per output."""
    import numpy as np

    import lmc

    cm = lmc.load(args.artifact, threads=args.threads)
    given = dict(_pair(item, "--input", str) for item in args.input)
    unknown = set(given) - {name for name, _ in cm.signature}
    if unknown:
        raise LmcError(f"--input names {sorted(unknown)} are not inputs of the model; its "
                       f"inputs: {', '.join(f'{n}: {t}' for n, t in cm.signature)}")
    arrays = {name: _load_npy(path) for name, path in given.items()}
    env = dict(_pair(item, "--dim", int) for item in args.dim)
    inputs = random_inputs(cm.signature, arrays, env, np.random.default_rng(args.seed))
    outs = cm(*inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    for i, out in enumerate(outs):
        print(summarize(f"output{i}", out))
    if args.output:
        np.savez(args.output, **{f"output{i}": o for i, o in enumerate(outs)})
    return 0


def _load_npy(path: str):
    import numpy as np
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:  # not an .npy file (OSError: missing, handled by main)
        raise LmcError(f"cannot read input {path}: {exc}") from None


def _pair(item: str, flag: str, conv):
    name, sep, value = item.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, conv(value)
    except ValueError:
        raise LmcError(f"{flag} takes NAME=VALUE, got '{item}'") from None


def random_inputs(signature, given: dict, env: dict[str, int], rng) -> list:
    """The model's inputs: `given` arrays, others random at sizes bound by `env`, by the given
    arrays, or else 1."""
    import numpy as np

    from lmc.ir.types import eval_shape
    env = dict(env)
    for name, t in signature:
        if name in given:
            for d, n in zip(t.shape, np.shape(given[name])):
                if isinstance(d, str) and d.isidentifier():
                    env.setdefault(d, n)
    for _, t in signature:
        for s in sorted(t.symbols()):
            env.setdefault(s, 1)
    out = []
    for name, t in signature:
        if name in given:
            out.append(given[name])
            continue
        shape, dt = eval_shape(t.shape, env), t.dtype.to_numpy()
        if t.dtype.is_float:
            out.append(rng.standard_normal(shape).astype(dt))
        else:
            out.append(np.full(shape, dt.type(True) if dt.kind == "b" else 0, dt))
    return out


def summarize(name: str, x) -> str:
    """One line per output: shape, dtype, statistics and a checksum of the bytes."""
    import hashlib

    import numpy as np
    x = np.asarray(x, order="C")
    digest = hashlib.sha256(x.tobytes()).hexdigest()[:16]
    stats = ""
    if x.size and x.dtype.kind in "fiub":
        v = x.astype(np.float64)
        stats = (f"  mean={v.mean():.6g} std={v.std():.6g} min={v.min():.6g} "
                 f"max={v.max():.6g}")
    return f"{name}  {x.dtype}{list(x.shape)}{stats}  sha256:{digest}"


def cmd_inspect(args) -> int:
    """The manifest of an artifact, after checking its hashes; says whether it runs here."""
    from lmc.artifact import read
    art = read(args.artifact)
    art.verify()
    m = art.manifest
    print(f"artifact  {art.path} ({art.path.stat().st_size / 1024:.1f} KiB, hashes ok)")
    print(f"lmc       {m.get('lmc_version')}  target {m.get('target')}")
    cpu = m.get("cpu")
    if cpu:
        feats = [f for f in ("avx2", "fma", "avx512f") if f"+{f}" in cpu["features"].split(",")]
        print(f"cpu       {cpu['name']} ({', '.join(feats) or 'baseline'}), {cpu['triple']}, "
              f"{cpu['llvm']}, O{cpu['opt_level']}")
    problems = art.problems_on_this_cpu()
    try:
        art.check_version()
    except LmcError as exc:
        problems.insert(0, str(exc))
    print(f"runs here {'yes' if not problems else 'no: ' + '; '.join(problems)}")
    for key in ("inputs", "outputs"):
        print(f"{key:9s} " + ", ".join(f"{v['name']}: {v['type']}" for v in m.get(key, [])))
    w = m.get("weights", {})
    print(f"weights   {w.get('count', 0)} arrays, {w.get('bytes', 0) / 1024:.1f} KiB")
    print(f"pipeline  {m.get('pipeline')}")
    kernels = m.get("kernels", [])
    print(f"kernels   {len(kernels)}")
    for k in kernels:
        print(f"  {k['name']:40s} object {k['object_bytes']:>8d} B  LLVM IR {k['ir_bytes']:>8d} B"
              f"  {k['key'][:12]}")
    return 0


def cmd_demo(args) -> int:
    from lmc.demo import run_demo
    return run_demo(args.dump_ir)


if __name__ == "__main__":
    sys.exit(main())
