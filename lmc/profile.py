"""Where a compiled model's time goes: one row per step of its function (a kernel, a native op,
an op left to the interpreter, a view), averaged over repeated calls, with the GFLOP/s of the
GEMM-like kernels. `cm.profile(*inputs)`, `trainer.profile(*batch)`, `lmc run --profile`.

The times are wall-clock per step, measured in the calling thread around each step (a kernel's
worker threads run inside it), so they add up to the call's time less the runtime's own
bookkeeping; like any timing on a shared machine they vary between runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmc.ir.analysis import kernel_flops


@dataclass(frozen=True)
class StepTime:
    """One step of the function and its mean time per call."""

    index: int
    op: str         # the op, with its kind for a kernel.fused: "kernel.fused{matmul}"
    kind: str       # how the runtime runs it: kernel, native, fallback, constant, view
    loc: str
    result: str     # the result type(s)
    ms: float
    gflops: float | None  # GEMM work / time, for matmul, attention and grouped kernels


@dataclass(frozen=True)
class Profile:
    rows: list[StepTime] = field(default_factory=list)
    calls: int = 0

    @property
    def total_ms(self) -> float:
        return sum(r.ms for r in self.rows)

    def by_time(self) -> list[StepTime]:
        return sorted(self.rows, key=lambda r: -r.ms)

    def table(self, top: int = 25) -> str:
        """A markdown table of the `top` slowest steps and a total line."""
        total = self.total_ms or 1.0
        lines = [f"profile: {len(self.rows)} steps, {self.total_ms:.3f} ms per call "
                 f"(mean of {self.calls})", "",
                 "| # | op | runs as | result | ms | share | GFLOP/s | at |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ranked = self.by_time()
        for r in ranked[:top]:
            rate = "" if r.gflops is None else f"{r.gflops:.1f}"
            lines.append(f"| {r.index} | {r.op} | {r.kind} | {r.result} | {r.ms:.3f} | "
                         f"{100 * r.ms / total:.1f} % | {rate} | {r.loc} |")
        rest = ranked[top:]
        if rest:
            ms = sum(r.ms for r in rest)
            lines.append(f"| | {len(rest)} more steps | | | {ms:.3f} | {100 * ms / total:.1f} % "
                         "| | |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    @staticmethod
    def mean(profiles: list[Profile]) -> Profile:
        """Profiles of the same steps (one per train step, say) as one: mean times."""
        calls = sum(p.calls for p in profiles)
        rows = []
        for same in zip(*(p.rows for p in profiles)):
            ms = sum(r.ms * p.calls for r, p in zip(same, profiles)) / max(calls, 1)
            first = same[0]
            rate = None if first.gflops is None or ms <= 0 else \
                first.gflops * first.ms / ms
            rows.append(StepTime(first.index, first.op, first.kind, first.loc, first.result,
                                 ms, rate))
        return Profile(rows, calls)


def profile_of(steps, seconds: list[float], calls: int, env: dict[str, int]) -> Profile:
    """A Profile from runtime steps (`op`, `kind`) and their summed times over `calls`."""
    rows = []
    for i, (st, t) in enumerate(zip(steps, seconds)):
        op = st.op
        ms = 1e3 * t / max(calls, 1)
        flops = kernel_flops(op, env)
        name = f"{op.name}{{{op.kind}}}" if op.name == "kernel.fused" else op.name
        rows.append(StepTime(i, name, st.kind, str(op.loc),
                             ", ".join(str(v.type) for v in op.result_values), ms,
                             flops / (ms * 1e6) if flops and ms > 0 else None))
    return Profile(rows, calls)
