"""`lmc` on the command line. `lmc --help` lists the commands; each has its own --help."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmc.errors import LmcError

EPILOG = """examples:
  lmc demo                                      compile the built-in models, check vs PyTorch
  lmc train --steps 300 --sample 400            train the tiny GPT on the shipped Shakespeare,
                                                save the loss plot, print generated text
  lmc train --text my.txt --layers 4 --d 128 --save gpt.safetensors   ... on your own text
  lmc opt model.lmc -p canonicalize,cse,dce     run passes over a text IR file, print the result
  lmc opt model.lmc -p canonicalize --dump-ir dumps/   ... and write the IR after every pass
  lmc passes                                    list the passes a pipeline may name
  lmc compile model.lmc -o model.lmca           compile text IR (+ model.lmc.safetensors) for
                                                this CPU into one artifact file
  lmc inspect model.lmca                        versions, CPU, signature, kernels, weights
  lmc run model.lmca --dim B=2 --dim T=128      run it on random inputs, print output summaries
  lmc run model.lmca --input x=x.npy --output out.npz   ... on given inputs, save the outputs
  lmc run model.lmca --profile                  ... then print where the time goes, per step
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

    demo = sub.add_parser("demo", help="compile the built-in tiny GPT, MoE and LoRA models, "
                          "then train the GPT briefly",
                          description="Compile the built-in models with dynamic shapes, dump "
                          "their IR, print op counts and check outputs against eager PyTorch; "
                          "then train the tiny GPT on the shipped corpus for 150 compiled "
                          "steps, save the loss plot and print a sample.")
    demo.add_argument("--dump-ir", metavar="DIR", default="lmc-dumps",
                      help="where to write the IR dumps and the loss plot (default: "
                      "./lmc-dumps)")
    demo.add_argument("--no-train", action="store_true",
                      help="skip the training part (150 steps of the tiny GPT, ~40 s)")
    demo.set_defaults(fn=cmd_demo)

    passes = sub.add_parser("passes", help="list the registered passes and their options")
    passes.set_defaults(fn=cmd_passes)
    _add_artifact_commands(sub)
    _add_train_command(sub)
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
    run.add_argument("--profile", metavar="N", type=int, nargs="?", const=10, default=None,
                     help="then run N more times (default 10) and print where the time goes, "
                     "step by step")
    run.set_defaults(fn=cmd_run)

    ins = sub.add_parser("inspect", help="print an artifact's manifest",
                         description="Check ARTIFACT's hashes and print what it holds: lmc and "
                         "LLVM versions, target CPU, signature, kernels, weights, pipeline.")
    ins.add_argument("artifact")
    ins.set_defaults(fn=cmd_inspect)


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless there is none (None / a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _add_train_command(sub) -> None:
    tr = sub.add_parser("train", help="train the tiny GPT on text through compiled train steps",
                        formatter_class=_ShowDefaults,
                        description="Train lmc.zoo.TinyGPT as a character-level language model "
                        "on the shipped public-domain Shakespeare (or --text FILE). Every step "
                        "is one compiled forward + cross-entropy + backward + AdamW update "
                        "(lmc.compile_training); a progress bar shows loss and tokens/s. Saves "
                        "the loss curve as a PNG and prints text sampled from the trained "
                        "weights in eager PyTorch.")
    tr.add_argument("--text", metavar="FILE", help="UTF-8 text to learn (default: the shipped "
                    "corpus, lmc/data/corpus.txt); its last 10%% is the validation part")
    tr.add_argument("--steps", type=int, default=200, help="optimizer steps")
    tr.add_argument("--batch", type=int, default=16, help="sequences per step")
    tr.add_argument("--seq", type=int, default=64, help="characters per sequence (context)")
    tr.add_argument("--layers", type=int, default=2, help="transformer blocks")
    tr.add_argument("--d", type=int, default=64, help="model width")
    tr.add_argument("--heads", type=int, default=4, help="attention heads (must divide --d)")
    tr.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    tr.add_argument("--warmup", type=int, default=None, help="linear warm-up steps before "
                    "the cosine decay (default: 10%% of --steps, at most 100)")
    tr.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    tr.add_argument("--target", choices=["cpu", "ref"], default="cpu",
                    help="cpu: native kernels; ref: the numpy interpreter (slow, exact)")
    tr.add_argument("--seed", type=int, default=0, help="seeds the init, batches and sample")
    tr.add_argument("--plot", metavar="PATH", default="lmc-train-loss.png",
                    help="where to save the loss curve (PNG); 'none' for no plot")
    tr.add_argument("--save", metavar="PATH", help="save the trained weights (safetensors, "
                    "keys of model.state_dict(); vocabulary and config in the metadata)")
    tr.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass (forward, "
                    "autodiff, optimizer-step, fusion) to DIR")
    tr.add_argument("--sample", type=int, default=300, metavar="N",
                    help="after training print N generated characters (0: none)")
    tr.add_argument("--temperature", type=float, default=0.8,
                    help="sampling temperature; 0 = greedy")
    tr.add_argument("--prompt", help="text the sample continues (default: the corpus's first "
                    "line)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    """Train the char-level TinyGPT; print progress and results, save plot/weights/sample."""
    from lmc import charlm
    from lmc.datasets import CharCorpus, read_text, shipped_corpus

    config = charlm.TrainConfig(
        steps=args.steps, batch=args.batch, seq=args.seq, layers=args.layers, d=args.d,
        heads=args.heads, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup if args.warmup is not None else charlm.default_warmup(args.steps),
        target=args.target, seed=args.seed, dump_ir=args.dump_ir)
    config.check()   # before reading a large text or importing torch
    if args.sample < 0:
        raise LmcError(f"--sample takes a number of characters >= 0, got {args.sample}")
    text = read_text(args.text) if args.text else shipped_corpus()
    corpus = CharCorpus(text)
    prompt = args.prompt if args.prompt is not None else charlm.default_prompt(corpus, args.seq)
    try:   # a prompt character the corpus lacks: say so before training, not after
        corpus.encode(prompt)
    except LmcError as exc:
        raise LmcError(f"--prompt: {exc}") from None
    source = args.text or "shipped corpus (Shakespeare, Coriolanus; public domain)"
    for line in charlm.describe_run(config, corpus, source):
        print(line)
    result = charlm.train(config, corpus, progress=not args.no_progress)
    for line in charlm.summarize_run(result):
        print(line)
    if args.plot.lower() != "none":
        from lmc.plot import save_loss_plot
        val = (len(result.losses), result.val_loss) if result.val_loss is not None else None
        path = save_loss_plot(result.losses, args.plot, _plot_title(config, source), val)
        print(f"loss plot: {path}")
    if args.save:
        print(f"weights: {charlm.save_weights(result, args.save)}")
    if args.dump_ir:
        print(f"IR dumps: {args.dump_ir}/ (index.md)")
    if args.sample:
        text = charlm.generate(result.model, corpus, args.sample, prompt=prompt, seq=args.seq,
                               seed=args.seed, temperature=args.temperature)
        how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
        print(f"--- sample: {args.sample} characters ({how}) from the trained weights in "
              "eager PyTorch ---")
        print(prompt + text)
    return 0


def _plot_title(config, source: str) -> str:
    name = Path(source).name if Path(source).exists() else "Shakespeare"
    return (f"lmc train: TinyGPT L{config.layers} d{config.d} h{config.heads} on {name}, "
            f"batch {config.batch}x{config.seq}, target {config.target}")


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
    if args.profile:
        print()
        print(cm.profile(*inputs, repeat=args.profile))
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
    return run_demo(args.dump_ir, train=not args.no_train)


if __name__ == "__main__":
    sys.exit(main())
