"""`lmc train`: the shipped corpus, the char-level data helpers, the command on both targets
(losses printed, a valid PNG, weights that load back) and its errors."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc import charlm
from lmc.cli import main
from lmc.datasets import CharCorpus, shipped_corpus, strip_header
from lmc.zoo import TinyGPT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["train", "--steps", "3", "--layers", "1", "--d", "32", "--heads", "2", "--seq", "16",
        "--batch", "4", "--no-progress"]


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def test_corpus_ships_as_package_data_with_its_header():
    import lmc
    path = Path(lmc.__file__).parent / "data" / "corpus.txt"
    raw = path.read_text(encoding="utf-8")
    assert 30_000 <= len(raw.encode()) <= 80_000
    header = raw.split("\n", 1)[0]
    assert header.startswith("#") and "public domain" in header
    text = shipped_corpus()
    assert text == strip_header(raw) and not text.startswith("#")
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'lmc = ["data/*"]' in pyproject   # what puts corpus.txt into wheels


def test_char_corpus_encodes_splits_and_batches():
    rng = np.random.default_rng(fresh_seed())
    alphabet = list("abcdefg \n,.")
    text = "".join(rng.choice(alphabet, size=int(rng.integers(300, 500))))
    corpus = CharCorpus(text, val_fraction=0.2)
    assert corpus.chars == tuple(sorted(set(text)))
    assert corpus.decode(corpus.encode(text)) == text
    train, val = corpus.split("train"), corpus.split("val")
    assert len(train) + len(val) == len(text) and len(val) == int(len(text) * 0.2)
    seed = int(rng.integers(1 << 30))
    x, y = corpus.batch(np.random.default_rng(seed), 5, 13, "val")
    assert x.shape == y.shape == (5, 13) and x.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()             # targets: the next character
    x2, _ = corpus.batch(np.random.default_rng(seed), 5, 13, "val")
    assert (x == x2).all()                           # seeded
    windows = {corpus.decode(row) for row in x}
    assert all(w in corpus.decode(val) for w in windows)
    with pytest.raises(Exception, match="too few for --seq"):
        corpus.check_fits(len(val))
    with pytest.raises(Exception, match="not in the corpus vocabulary"):
        corpus.encode("xyz")


def test_generate_is_seeded_and_greedy_at_temperature_zero():
    corpus = CharCorpus("to be or not to be, that is the question\n" * 3)
    torch.manual_seed(fresh_seed() % 10_000)
    model = TinyGPT(corpus.vocab_size, d=16, layers=1, heads=2, max_seq=8)
    kw = {"prompt": "to be", "seq": 8}
    a = charlm.generate(model, corpus, 23, seed=5, **kw)
    assert len(a) == 23 and set(a) <= set(corpus.chars)
    assert a == charlm.generate(model, corpus, 23, seed=5, **kw)
    greedy = charlm.generate(model, corpus, 11, temperature=0, **kw)
    assert greedy == charlm.generate(model, corpus, 11, temperature=0, seed=9, **kw)


def _run_ok(args, capsys) -> str:
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _check_png(path: Path) -> None:
    from PIL import Image
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def _losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"step +\d+/3 +loss (\d+\.\d+)", out)]


@pytest.mark.parametrize("target", ["ref", "cpu"])
def test_train_runs_on_both_targets(tmp_path, capsys, target):
    png, weights = tmp_path / "plots" / "loss.png", tmp_path / "w.safetensors"
    args = [*TINY, "--target", target, "--plot", str(png), "--save", str(weights),
            "--sample", "25", "--seed", str(fresh_seed() % 1000)]
    if target == "ref":   # (dumps cost the cold cpu compile a few seconds more)
        args += ["--dump-ir", str(tmp_path / "dumps")]
    out = _run_ok(args, capsys)
    losses = _losses(out)
    assert len(losses) == 3 and all(2.0 < v < 6.0 for v in losses)   # ~ln(59) at the start
    rel = float(re.search(r"relative difference ([0-9.e+-]+)\)", out).group(1))
    assert rel < 1e-4                     # lmc's step-1 loss is eager PyTorch's
    assert "validation loss" in out and f"loss plot: {png}" in out
    _check_png(png)
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lmc-charlm" and '"layers": 1' in meta["config"]
    vocab = CharCorpus(shipped_corpus()).vocab_size
    model = TinyGPT(vocab, d=32, layers=1, heads=2, max_seq=16)
    model.load_state_dict(load_file(str(weights)))      # every key, every shape
    sample = out.split("eager PyTorch ---\n", 1)[1]
    assert sample.startswith("First Citizen:\n") and len(sample) >= len("First Citizen:\n") + 25
    if target == "ref":
        dumps = sorted(p.name for p in (tmp_path / "dumps").iterdir())
        assert "index.md" in dumps and any("autodiff" in d for d in dumps)


def test_train_on_a_given_text_without_plot(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = _run_ok([*TINY, "--target", "ref", "--text", str(text), "--plot", "none",
                   "--sample", "10", "--temperature", "0"], capsys)
    assert "vocabulary 28" in out and "loss plot" not in out and "greedy" in out
    assert len(_losses(out)) == 3


@pytest.mark.parametrize("extra, message", [
    (["--text", "no/such/file.txt"], "no such file"),
    (["--d", "30", "--heads", "4"], "not a multiple of --heads"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--warmup", "9"], "--warmup must be between 0 and --steps"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--sample", "-2"], "--sample takes"),
    (["--prompt", "@@"], "--prompt: characters"),
])
def test_bad_options_are_one_line_errors(capsys, extra, message):
    assert main([*TINY, *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmc: error:") and message in err and "Traceback" not in err


def test_too_short_or_binary_text_is_refused(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert main([*TINY, "--text", str(short)]) == 1
    assert "too few for --seq 16" in capsys.readouterr().err
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(128, 256)))
    assert main([*TINY, "--text", str(binary)]) == 1
    assert "not UTF-8 text" in capsys.readouterr().err


def test_unknown_target_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--target", "gpu"])
    assert exc.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err
