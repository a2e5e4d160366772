"""A character-level language model trained through lmc: `lmc train` and the training part of
`lmc demo`. The built-in `lmc.zoo.TinyGPT` learns next-character prediction on a text, each step
one compiled forward + cross-entropy + backward + AdamW update (`lmc.compile_training`); the
trained weights then run in eager PyTorch to score the validation text and to write a sample."""
from __future__ import annotations

import copy
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmc.datasets import CharCorpus
from lmc.errors import LmcError
from lmc.losses import lm_cross_entropy as cross_entropy  # mean next-character loss
from lmc.options import TARGETS

VAL_BATCHES = 8   # fixed validation batches scored after training (eager torch, no grad)


@dataclass(frozen=True)
class TrainConfig:
    """Model size, batch shape and optimizer settings of one run; `check()` names a bad one."""

    steps: int = 200
    batch: int = 16
    seq: int = 64
    layers: int = 2
    d: int = 64
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    target: str = "cpu"
    seed: int = 0
    dump_ir: str | None = None

    def check(self) -> None:
        for name in ("steps", "batch", "seq", "layers", "d", "heads"):
            if getattr(self, name) < 1:
                raise LmcError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.d % self.heads:
            raise LmcError(f"--d {self.d} is not a multiple of --heads {self.heads}: each "
                           "attention head gets d / heads channels; pick d divisible by heads")
        if not self.lr > 0:
            raise LmcError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup <= self.steps:
            raise LmcError(f"--warmup must be between 0 and --steps ({self.steps}), got "
                           f"{self.warmup}")
        if self.weight_decay < 0:
            raise LmcError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if self.target not in TARGETS:
            raise LmcError(f"--target {self.target!r} is not one of {', '.join(TARGETS)}")


@dataclass
class TrainResult:
    config: TrainConfig
    corpus: CharCorpus
    model: object                    # lmc.zoo.TinyGPT holding the trained weights
    state: dict                      # trainer.state_dict(): torch tensors, model's keys
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0
    eager_first_loss: float = 0.0    # eager PyTorch's loss of the initial model on batch 1
    val_loss: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch * self.config.seq

    def median_step_s(self) -> float:
        """Median step time after the first (which may still build kernels)."""
        times = self.step_seconds[1:] or self.step_seconds
        return statistics.median(times)

    def first_step_rel_diff(self) -> float:
        """|lmc - eager| / |eager| of the loss at step 1: both see the same weights and batch."""
        return abs(self.losses[0] - self.eager_first_loss) / max(abs(self.eager_first_loss),
                                                                   1e-12)


def default_warmup(steps: int) -> int:
    """10% of the run, at most 100 steps: long enough for Adam's moment estimates to settle."""
    return max(0, min(100, steps // 10))


def build_model(config: TrainConfig, vocab: int):
    """TinyGPT sized by `config`, initialized from `config.seed`."""
    import torch

    from lmc.zoo import TinyGPT
    torch.manual_seed(config.seed)
    return TinyGPT(vocab=vocab, d=config.d, layers=config.layers, heads=config.heads,
                   max_seq=config.seq)


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        raise LmcError("lmc train's progress bar needs tqdm: pip install 'lmc[train]'") from None
    return tqdm


def compile_trainer(config: TrainConfig, model, example):
    """lmc.compile_training with AdamW under a linear-warmup cosine schedule."""
    import lmc
    optimizer = lmc.optim.AdamW(lr=config.lr, weight_decay=config.weight_decay,
                                schedule=lmc.optim.WarmupCosine(config.warmup, config.steps))
    return lmc.compile_training(model, example, loss_fn=cross_entropy, optimizer=optimizer,
                                target=config.target, dump_ir=config.dump_ir)


def train(config: TrainConfig, corpus: CharCorpus, *, progress: bool = True,
          log_every: int | None = None, indent: str = "") -> TrainResult:
    """Compiles the train step and runs `config.steps` steps on seeded random batches, with a
    tqdm bar (loss, tokens/s; shown on a terminal only) and a printed line every `log_every`
    steps (default: ~10 lines)."""
    import torch

    config.check()
    corpus.check_fits(config.seq)
    tqdm = _tqdm()

    def log(line: str) -> None:   # tqdm.write: printed lines do not tear the bar
        tqdm.write(indent + line)
    log_every = log_every or max(1, config.steps // 10)
    rng = np.random.default_rng(config.seed)
    batches = (tuple(torch.from_numpy(a) for a in corpus.batch(rng, config.batch, config.seq))
               for _ in range(config.steps))
    first = next(batches)
    model = build_model(config, corpus.vocab_size)
    with torch.no_grad():
        eager_first = float(cross_entropy(model(first[0]), first[1]))
    log(f"compiling the train step (forward + cross-entropy + backward + AdamW) for target "
        f"{config.target} ...")
    trainer = compile_trainer(config, copy.deepcopy(model), first)
    log(f"compiled in {trainer.compile_seconds:.1f} s")
    result = TrainResult(config, corpus, model, {}, compile_seconds=trainer.compile_seconds,
                         eager_first_loss=eager_first)
    bar = tqdm(total=config.steps, desc=f"train ({config.target})", unit="step",
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, leave=False)
    with bar:
        for step, batch in enumerate(itertools.chain([first], batches), 1):
            start = time.perf_counter()
            loss = trainer.step(*batch)
            result.step_seconds.append(time.perf_counter() - start)
            result.losses.append(float(loss))
            tok_s = result.tokens_per_step / result.step_seconds[-1]
            bar.set_postfix_str(f"loss {loss:.4f}, {tok_s:,.0f} tok/s")
            bar.update()
            if step == 1 or step % log_every == 0 or step == config.steps:
                log(f"step {step:>5d}/{config.steps}  loss {loss:.4f}  {tok_s:>9,.0f} tok/s")
    result.state = trainer.state_dict()
    model.load_state_dict(result.state)
    result.val_loss = validation_loss(model, corpus, config)
    return result


def validation_loss(model, corpus: CharCorpus, config: TrainConfig) -> float | None:
    """Mean loss of the (trained) eager model over fixed seeded batches of the validation part."""
    import torch
    if not corpus.val_fraction:
        return None
    rng = np.random.default_rng(config.seed + 1)
    losses = []
    with torch.no_grad():
        for _ in range(VAL_BATCHES):
            x, y = (torch.from_numpy(a) for a in corpus.batch(rng, config.batch, config.seq,
                                                               "val"))
            losses.append(float(cross_entropy(model(x), y)))
    return float(np.mean(losses))


def generate(model, corpus: CharCorpus, n: int, *, prompt: str, seq: int, seed: int = 0,
             temperature: float = 0.8) -> str:
    """n characters after `prompt` from the eager model: sampled from softmax(logits / T) with a
    seeded generator, or greedy (argmax) when temperature is 0. The context is cropped to the
    model's `seq` positions."""
    import torch
    if temperature < 0:
        raise LmcError(f"--temperature must not be negative, got {temperature}")
    ids = torch.from_numpy(corpus.encode(prompt))[None, :]
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids[:, -seq:])[0, -1]
            if temperature == 0:
                nxt = logits.argmax().view(1, 1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
    return corpus.decode(ids[0, -n:].tolist()) if n else ""


def default_prompt(corpus: CharCorpus, seq: int) -> str:
    """The text's first line (for the shipped corpus, a speaker: 'First Citizen:'), newline
    included, its last `seq` characters if longer."""
    line = corpus.text.split("\n", 1)[0] + "\n" if "\n" in corpus.text else corpus.text[:1]
    return line[-seq:]


def save_weights(result: TrainResult, path: str | Path) -> Path:
    """The trained weights as safetensors (keys of model.state_dict()), with the vocabulary and
    the config in the metadata so that the model can be rebuilt from the file alone."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in result.state.items()}
    meta = {"format": "lmc-charlm", "vocab": json.dumps("".join(result.corpus.chars)),
            "config": json.dumps({k: v for k, v in asdict(result.config).items()
                                  if k != "dump_ir"})}
    save_file(tensors, str(path), metadata=meta)
    return path


def describe_run(config: TrainConfig, corpus: CharCorpus, source: str) -> list[str]:
    """What is about to be trained, on what: printed before the run."""
    train_n, val_n = len(corpus.split("train")), len(corpus.split("val"))
    params = sum(p.numel() for p in build_model(config, corpus.vocab_size).parameters())
    return [f"corpus: {source}: {len(corpus.text):,} characters, vocabulary "
            f"{corpus.vocab_size}; train {train_n:,} / validation {val_n:,}",
            f"model:  TinyGPT L{config.layers} d{config.d} h{config.heads} ({params:,} "
            f"parameters); batch {config.batch} x {config.seq} characters",
            f"optim:  AdamW lr {config.lr:g}, weight decay {config.weight_decay:g}, warmup "
            f"{config.warmup} steps then cosine to step {config.steps}; target {config.target}"]


def summarize_run(result: TrainResult) -> list[str]:
    """The outcome: loss first → last, validation loss, speed, the step-1 check vs eager."""
    losses, cfg = result.losses, result.config
    tail = losses[-min(10, len(losses)):]
    val = f"; validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    step_s = result.median_step_s()
    return [f"trained {len(losses)} steps in {sum(result.step_seconds):.1f} s (+ compile "
            f"{result.compile_seconds:.1f} s): loss {losses[0]:.4f} -> {np.mean(tail):.4f} "
            f"(mean of the last {len(tail)}){val}",
            f"median step {1e3 * step_s:.1f} ms, {result.tokens_per_step / step_s:,.0f} "
            f"tokens/s on target {cfg.target}; step-1 loss {losses[0]:.6f} vs eager PyTorch "
            f"{result.eager_first_loss:.6f} (relative difference "
            f"{result.first_step_rel_diff():.1e})"]
