"""CPU training-step benchmark: the tiny GPT's forward + cross-entropy + backward + AdamW update,
lmc (`lmc.compile_training`, target cpu) vs torch eager vs torch.compile, in the same run, fp32.

One fresh worker process (thread counts set before torch loads; empty torch.compile and lmc
caches, so compile times are cold) builds every tool from the same initial weights, times its
first step (its compile), warms it up, then times steps in rounds that alternate the tools with
a pause between blocks (bench/cpu.py's `measure`: a block during which other processes were
busy is redone). Every tool sees the same batch sequence, so its losses can be compared with
eager's step by step: the "max rel Δ loss" column is the sanity check that a fast step is also
a right one. Prints a markdown table and writes `bench/results/train-<date>[-quick].json`/`.md`.

    .venv/bin/python bench/train.py [--reps 20] [--rounds 5] [--tools eager,compile,lmc]
        [--vocab 4096 --layers 4 --d 256 --heads 4 --seq 128 --batch 8] [--wait-quiet 120]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/cpu.py: the shared measuring machinery (machine facts, noise monitor, alternating rounds)
from cpu import (
    QUIET_CORES,
    ROOT,
    CpuMonitor,
    machine_facts,
    measure,
    one_line,
    wait_quiet,
    worker_env,
)

TOOLS = ("eager", "eager_fused", "compile", "compile_opt", "lmc")
DEFAULT_TOOLS = ("eager", "compile", "lmc")
LABELS = {"eager": "torch eager, AdamW", "eager_fused": "torch eager, fused AdamW",
          "compile": "torch.compile (model), AdamW eager",
          "compile_opt": "torch.compile (model + optimizer step)",
          "lmc": "lmc (target cpu): one compiled step"}
BATCHES = 8          # distinct batches, cycled: step i of every tool uses batch i % BATCHES
WARMUP_STEPS = 2     # after the first (compiling) step, before timing
# ../shared/reference/baselines.md, same sizes, 2 threads
BASELINE = "eager 274 ms, fused AdamW 261 ms, torch.compile 319 ms (first step 33 s)"
GOAL_EAGER, GOAL_COMPILE = 1.2, 1.0   # lmc's speed-up over torch eager / over torch.compile


@dataclass(frozen=True)
class Shape:
    vocab: int = 4096
    layers: int = 4
    d: int = 256
    heads: int = 4
    seq: int = 128
    batch: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def title(self) -> str:
        return (f"TinyGPT V{self.vocab} L{self.layers} d{self.d} h{self.heads} T{self.seq} "
                f"B{self.batch}, forward + cross-entropy + backward + AdamW, fp32")


# ---------------------------------------------------------------- tools (worker side)

class Tool:
    """One way to run the train step; `step()` trains on the next batch and keeps its loss."""

    def __init__(self, batches: list):
        self.batches, self.losses = batches, []

    def next_batch(self):
        return self.batches[len(self.losses) % len(self.batches)]

    def step(self) -> float:
        loss = self._step(*self.next_batch())
        self.losses.append(loss)
        return loss


class TorchTool(Tool):
    """torch.optim.AdamW over a model copy; `compile_model` / `compile_opt` wrap the forward /
    the optimizer step in torch.compile (inductor, default mode)."""

    def __init__(self, model, batches, shape: Shape, *, fused=False, compile_model=False,
                 compile_opt=False):
        import torch
        super().__init__(batches)
        self.model = model
        self.forward = torch.compile(model) if compile_model else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=shape.lr,
                                     weight_decay=shape.weight_decay, fused=fused or None)
        self.opt_step = torch.compile(self.opt.step) if compile_opt else self.opt.step

    def _step(self, x, y) -> float:
        from lmc.losses import lm_cross_entropy
        self.opt.zero_grad(set_to_none=True)
        loss = lm_cross_entropy(self.forward(x), y)
        loss.backward()
        self.opt_step()
        return float(loss.detach())


class LmcTool(Tool):
    """lmc.compile_training: forward, loss, backward and AdamW as one compiled step."""

    def __init__(self, model, batches, shape: Shape, threads: int):
        import lmc
        from lmc.losses import lm_cross_entropy
        super().__init__(batches)
        self.trainer = lmc.compile_training(
            model, batches[0], loss_fn=lm_cross_entropy, target="cpu",
            optimizer=lmc.optim.AdamW(lr=shape.lr, weight_decay=shape.weight_decay),
            options=lmc.CompileOptions(threads=threads))
        self.compile_s = self.trainer.compile_seconds

    def _step(self, x, y) -> float:
        return self.trainer.step(x, y)


def build_tool(name: str, model, batches, shape: Shape, threads: int) -> Tool:
    if name == "lmc":
        return LmcTool(model, batches, shape, threads)
    return TorchTool(model, batches, shape, fused=name == "eager_fused",
                     compile_model=name.startswith("compile"), compile_opt=name == "compile_opt")


def setup(names: list[str], shape: Shape, threads: int) -> tuple[dict, dict]:
    """Every tool from the same initial weights: ({name: tool}, {name: info}); a tool that fails
    has its error in info. `first_step_s` is the build plus the first step (for torch.compile
    and lmc, the compile)."""
    import torch

    from lmc.zoo import TinyGPT
    torch.manual_seed(0)
    model = TinyGPT(shape.vocab, shape.d, shape.layers, shape.heads, shape.seq)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
                     for _ in range(2)) for _ in range(BATCHES)]
    tools, infos = {}, {}
    for name in names:
        info = infos[name] = {}
        try:
            start = time.perf_counter()
            tool = build_tool(name, copy.deepcopy(model), batches, shape, threads)
            tool.step()
            info["first_step_s"] = time.perf_counter() - start
            if isinstance(tool, LmcTool):   # what the step became: kernels, fallbacks
                info["compile_s"] = tool.compile_s
                info["report"] = json.loads(json.dumps(tool.trainer.report, default=str))
            for _ in range(WARMUP_STEPS):
                tool.step()
            tools[name] = tool
        except Exception as e:  # soft failure: the table shows the error, the run goes on
            info["error"] = one_line(e)
        print(f"  {name}: {info.get('error', 'ready')}", file=sys.stderr, flush=True)
    return tools, infos


def loss_check(losses: list[float], eager: list[float]) -> dict:
    """Max relative difference to eager's loss over the steps both ran."""
    n = min(len(losses), len(eager))
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[:n], eager[:n])]
    return {"loss_max_rel_diff": max(diffs) if diffs else None, "loss_steps_compared": n,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses
            else None}


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    shape = Shape(**json.loads(args.shape))
    names = list(dict.fromkeys(["eager", *args.tools]))  # eager: the loss reference
    tools, infos = setup(names, shape, args.threads)
    timed_tools = {n: t for n, t in tools.items() if n in args.tools}
    print("[train] timing", file=sys.stderr, flush=True)
    timed = measure({"train": {n: t.step for n, t in timed_tools.items()}}, args.reps,
                    min(args.rounds, args.reps), args.noise_retries)
    for (_, name), m in timed.items():
        info = infos[name]
        if isinstance(m, str):
            info["error"] = m
            continue
        med = statistics.median(m["times"])
        info.update(median_ms=med * 1e3, min_ms=min(m["times"]) * 1e3, n=len(m["times"]),
                    tokens_per_s=shape.tokens / med,
                    times_ms=[round(t * 1e3, 3) for t in m["times"]],
                    max_other_cores=m["other_cores"], discarded_blocks=m["discarded"])
    eager = tools["eager"].losses if "eager" in tools else []
    for name, tool in tools.items():
        infos[name].update(loss_check(tool.losses, eager))
    if "eager" not in args.tools:
        infos.pop("eager", None)
    return {"tools": infos}


# ---------------------------------------------------------------- driver (parent side)

def spawn(args, shape: Shape) -> dict:
    """The worker in a fresh process with empty compile caches; its JSON or an error."""
    with tempfile.TemporaryDirectory(prefix="lmc-bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        env = worker_env(args.threads, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                         LMC_CACHE_DIR=os.path.join(tmp, "lmc"))
        cmd = [sys.executable, __file__, "--worker", "--json-out", str(out),
               "--shape", json.dumps(asdict(shape)), "--reps", str(args.reps),
               "--rounds", str(args.rounds), "--threads", str(args.threads),
               "--tools", ",".join(args.tools), "--noise-retries", str(args.noise_retries)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=3600, stdout=sys.stderr)
        except subprocess.TimeoutExpired:
            return {"error": "the worker timed out after 3600 s"}
        if proc.returncode != 0 or not out.exists():
            return {"error": f"the worker exited with status {proc.returncode}"}
        return {**json.loads(out.read_text()), "process_wall_s": time.perf_counter() - start}


def cell(info: dict, key: str, fmt: str) -> str:
    return "—" if info.get(key) is None else format(info[key], fmt)


def speedup(lmc: dict, anchor: dict | None) -> float | None:
    if not anchor or "median_ms" not in anchor or "median_ms" not in lmc:
        return None
    return anchor["median_ms"] / lmc["median_ms"]


def render(res: dict, facts: dict, shape: Shape) -> str:
    """Machine line, one row per tool, then the goals with lmc's ratios."""
    v = facts["versions"]
    lines = [f"Training-step benchmark {facts['date']}: {shape.title()}; {facts['cpu']} "
             f"({facts['cpu_model']}), {facts['cores']} cores, {facts['threads']} threads per "
             f"tool; torch {v['torch']}, llvmlite {v['llvmlite']}; commit {facts['commit']}; "
             f"other processes used {facts['other_cores']:.2f} cores on average. Medians of "
             f"{facts['reps']} steps per tool in {facts['rounds']} alternating rounds.", ""]
    if "error" in res:
        return "\n".join([*lines, f"error: {res['error']}", ""])
    tools = res["tools"]
    eager = tools.get("eager")
    head = ["tool", "median ms/step", "fastest step ms", "tokens/s", "first step (compile) s",
            "max rel Δ loss vs eager", "speed-up vs eager"]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for name, info in tools.items():
        if "error" in info:
            lines.append(f"| {LABELS[name]} | error: {info['error'][:90]} | | | | | |")
            continue
        noisy = (f" (noisy: others {info['max_other_cores']:.1f} cores)"
                 if info.get("max_other_cores", 0.0) >= QUIET_CORES else "")
        ratio = speedup(info, eager)
        lines.append(f"| {LABELS[name]} | {cell(info, 'median_ms', '.1f')}{noisy} | "
                     f"{cell(info, 'min_ms', '.1f')} | "
                     f"{cell(info, 'tokens_per_s', ',.0f')} | {cell(info, 'first_step_s', '.1f')}"
                     f" | {cell(info, 'loss_max_rel_diff', '.1e')} | "
                     f"{'—' if ratio is None else f'{ratio:.2f}×'} |")
    lines += ["", *goal_lines(tools)]
    report = tools.get("lmc", {}).get("report")
    if report:
        steps = ", ".join(f"{k}×{v}" for k, v in report.get("steps", {}).items())
        lines.append(f"lmc's step at runtime: {steps}; interpreter fallbacks: "
                     f"{', '.join(report.get('fallback', [])) or 'none'}.")
    if shape == Shape():
        lines.append(f"Reference figures (baselines.md, same sizes, 2 threads): {BASELINE}.")
    lines += ["max rel Δ loss: over every step both ran (same initial weights, same batches); "
              "float rounding grows over the steps, a wrong gradient shows at once. Fastest "
              "step: the least disturbed by other tenants of the machine (the goals use "
              "medians).", ""]
    return "\n".join(lines)


def goal_lines(tools: dict) -> list[str]:
    lmc = tools.get("lmc", {})
    out = []
    for anchor, goal in (("eager", GOAL_EAGER), ("compile", GOAL_COMPILE)):
        ratio = speedup(lmc, tools.get(anchor))
        met = "—" if ratio is None else ("met" if ratio >= goal else "not met")
        shown = "—" if ratio is None else f"{ratio:.2f}×"
        out.append(f"Goal: lmc ≥ {goal:.1f}× {LABELS[anchor]}: {shown} ({met}).")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Shape()
    for name in ("vocab", "layers", "d", "heads", "seq", "batch"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--reps", type=int, default=20, help="timed steps per tool (median)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps in 2 rounds")
    p.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help=f"from {','.join(TOOLS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--noise-retries", type=int, default=2,
                   help="redo a timed block up to N times when other processes were busy")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help=f"first wait up to S seconds for others to use < {QUIET_CORES} cores")
    p.add_argument("--out", help="results path without extension (default "
                   "bench/results/train-<date>[-quick])")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.rounds = 4, 2
    args.tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in args.tools if t not in TOOLS]
    if bad or not args.tools:
        p.error(f"unknown tool(s) {','.join(bad)}; choose from {','.join(TOOLS)}")
    if args.reps < 1 or args.rounds < 1:
        p.error("need --reps >= 1 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        Path(args.json_out).write_text(json.dumps(run_worker(args), indent=1) + "\n")
        return
    sys.path.insert(0, str(ROOT))
    shape = Shape(args.vocab, args.layers, args.d, args.heads, args.seq, args.batch, args.lr)
    facts = machine_facts(args.threads)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    monitor = CpuMonitor()
    res = spawn(args, shape)
    facts.update(monitor.cores())
    facts.update(date=date, load_avg_end=os.getloadavg()[0], reps=args.reps,
                 rounds=min(args.rounds, args.reps), tools=args.tools)
    table = render(res, facts, shape)
    print(table)
    stem = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"train-{date}{'-quick' if args.quick else ''}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": facts, "shape": asdict(shape),
           "goals": {"vs_eager": f"≥ {GOAL_EAGER}×", "vs_compile": f"≥ {GOAL_COMPILE}×",
                     "baseline": BASELINE}, "results": res}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem.with_suffix('.json')} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
