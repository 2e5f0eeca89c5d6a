"""Fine-tuning corpora for the accuracy suite, none downloaded: a synthetic Markov language, Python's own sources, a user's file.

Each corpus gives token batches (batch x seq_len int64) for three disjoint uses: `pretrain` (to make a base
model worth fine-tuning from a random init), `finetune` (the task) and `heldout` (the same distribution as
finetune, never trained on). `loss_floor` is the best possible held-out loss in nats per token when known.

- synthetic: a first-order Markov chain over `vocab` tokens whose rows are sparse Dirichlet draws. The base
  is pretrained on one chain; the task is a shifted chain (half of the rows re-drawn), so the held-out floor
  is the task chain's entropy rate sum_i pi_i H(P_i) (pi: its stationary distribution). Cheap: CPU-testable.
- stdlib: the standard library's .py files (byte-level tokens, vocab 256), sorted by path and split by index
  (i % 10 < 6: pretrain, 6..8: finetune, 9: heldout), read up to a byte cap per part.
- file: a user's JSONL ({"text": ...} per line) or plain text file, byte-level or with the model directory's
  own tokenizer.json (the `tokenizers` library, local file only); the last tenth of the lines is held out.
  No pretraining: the base is the model itself.
"""

from __future__ import annotations

import functools
import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from falqon_bench.data.errors import BenchInputError

CORPUS_KINDS = ("synthetic", "stdlib", "file")
BYTE_VOCAB = 256
SYNTHETIC_VOCAB = 64
POOL_CHAINS, POOL_LEN = 512, 256  # synthetic tokens drawn per part: 131 k
_PARTS = ("pretrain", "finetune", "heldout")
_STDLIB_CAPS = {"pretrain": 6_000_000, "finetune": 3_000_000, "heldout": 500_000}  # bytes per part


@dataclass
class Corpus:
    """Token sources of one corpus. `sample(part, generator, batch, seq_len)` -> batch x seq_len int64 (CPU)."""

    name: str
    vocab_size: int
    sample: Callable[[str, torch.Generator, int, int], torch.Tensor]
    loss_floor: float | None = None
    can_pretrain: bool = True

    def heldout_batches(self, n_batches: int, batch: int, seq_len: int, seed: int = 12345) -> list[torch.Tensor]:
        """The fixed held-out set: the same batches for every method, lr and seed of a run."""
        g = torch.Generator().manual_seed(seed)
        return [self.sample("heldout", g, batch, seq_len) for _ in range(n_batches)]


# ---------------------------------------------------------------- synthetic Markov language


def markov_chain(vocab: int, generator: torch.Generator, concentration: float = 0.05) -> torch.Tensor:
    """A vocab x vocab row-stochastic matrix, rows ~ Dirichlet(concentration): a few likely successors per token."""
    gamma = torch.distributions.Gamma(torch.full((vocab,), concentration), torch.ones(vocab))
    rows = torch.stack([_gamma_sample(gamma, generator) for _ in range(vocab)])
    rows = rows + 1e-6
    return (rows / rows.sum(dim=1, keepdim=True)).double()


def _gamma_sample(gamma: torch.distributions.Gamma, generator: torch.Generator) -> torch.Tensor:
    # torch's Gamma sampler takes no generator: draw with the global RNG forked from ours
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return gamma.sample()


def shifted_chain(base: torch.Tensor, generator: torch.Generator, fraction: float = 0.5) -> torch.Tensor:
    """The task chain: `fraction` of the base chain's rows re-drawn (the rest unchanged)."""
    vocab = base.shape[0]
    fresh = markov_chain(vocab, generator)
    redraw = torch.randperm(vocab, generator=generator)[: int(round(fraction * vocab))]
    out = base.clone()
    out[redraw] = fresh[redraw]
    return out


def entropy_rate(chain: torch.Tensor) -> float:
    """sum_i pi_i H(P_i) in nats, pi the stationary distribution (power iteration from uniform)."""
    pi = torch.full((chain.shape[0],), 1.0 / chain.shape[0], dtype=torch.float64)
    for _ in range(2000):
        pi = pi @ chain
    row_entropy = -(chain * chain.clamp_min(1e-300).log()).sum(dim=1)
    return float((pi * row_entropy).sum())


def sample_chain(chain: torch.Tensor, generator: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """batch sequences of the chain, each from a uniform start token."""
    vocab = chain.shape[0]
    tokens = torch.empty(batch, seq_len, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
    for t in range(1, seq_len):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    return tokens


@functools.lru_cache(maxsize=4)  # one worker runs many points of one corpus
def synthetic_corpus(seed: int, vocab: int = SYNTHETIC_VOCAB) -> Corpus:
    """Base chain (pretrain) and shifted task chain (finetune, heldout) from one seed."""
    g = torch.Generator().manual_seed(seed)
    base = markov_chain(vocab, g)
    task = shifted_chain(base, g)

    pools: dict[str, torch.Tensor] = {}

    def sample(part: str, generator: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
        # windows of a pool of long chains, drawn once per part (one multinomial call per position, not per batch)
        if part not in pools:
            chain = base if part == "pretrain" else task
            # each part's pool from its own seed: the same pools whichever part a process asks for first (a worker
            # that loads a cached base never draws the pretrain pool)
            pool_seed = seed * len(_PARTS) + _PARTS.index(part)
            pools[part] = sample_chain(chain, torch.Generator().manual_seed(pool_seed), POOL_CHAINS, POOL_LEN)
        pool = pools[part]
        if seq_len > pool.shape[1]:
            raise BenchInputError(f"seq_len {seq_len} exceeds the synthetic corpus's chain length {pool.shape[1]}")
        rows = torch.randint(0, pool.shape[0], (batch,), generator=generator)
        starts = torch.randint(0, pool.shape[1] - seq_len + 1, (batch,), generator=generator)
        return torch.stack([pool[r, s : s + seq_len] for r, s in zip(rows.tolist(), starts.tolist())])

    return Corpus(name="synthetic", vocab_size=vocab, sample=sample, loss_floor=entropy_rate(task))


# ---------------------------------------------------------------- bytes of text


def _byte_sampler(parts: dict[str, torch.Tensor]) -> Callable[[str, torch.Generator, int, int], torch.Tensor]:
    def sample(part: str, generator: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
        data = parts[part]
        if data.numel() <= seq_len:
            raise BenchInputError(f"the {part} part of the corpus has {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=generator)
        return torch.stack([data[s : s + seq_len] for s in starts.tolist()])

    return sample


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by path, without site-packages (deterministic per Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


@functools.lru_cache(maxsize=1)
def stdlib_corpus(caps: tuple[tuple[str, int], ...] | None = None) -> Corpus:
    """Python's own sources as bytes; parts by file index (i % 10: 0-5 pretrain, 6-8 finetune, 9 heldout)."""
    caps = dict(caps) if caps else _STDLIB_CAPS
    chunks: dict[str, list[bytes]] = {"pretrain": [], "finetune": [], "heldout": []}
    sizes = dict.fromkeys(chunks, 0)
    for i, path in enumerate(stdlib_files()):
        part = "pretrain" if i % 10 < 6 else "finetune" if i % 10 < 9 else "heldout"
        if sizes[part] >= caps[part]:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks[part].append(data)
        sizes[part] += len(data)
    if not all(sizes.values()):
        raise BenchInputError(f"the standard library at {sysconfig.get_paths()['stdlib']} has too few .py files for the stdlib corpus")
    parts = {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8).to(torch.int64) for k, v in chunks.items()}
    return Corpus(name="stdlib", vocab_size=BYTE_VOCAB, sample=_byte_sampler(parts))


def read_texts(path: Path) -> list[str]:
    """Lines of a .jsonl file ({"text": ...} each) or paragraphs of a text file; one clear error otherwise."""
    if not path.exists():
        raise BenchInputError(f"corpus file {path} does not exist")
    if not path.is_file():
        raise BenchInputError(f"corpus_path {path} is not a file; give a .jsonl ({{\"text\": ...}} per line) or text file")
    try:
        raw = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is not text
    except (OSError, UnicodeDecodeError) as e:
        raise BenchInputError(f"corpus file {path} cannot be read as UTF-8 text: {e}") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchInputError(f"{path} line {n}: not JSON ({e.msg}); each line must be {{\"text\": ...}}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise BenchInputError(f"{path} line {n}: each line must be a JSON object with a string \"text\"")
            texts.append(obj["text"])
    else:
        texts = [p for p in raw.split("\n\n") if p.strip()]
    if len(texts) < 2:
        raise BenchInputError(f"corpus file {path} holds {len(texts)} text(s); need at least 2 (one tenth is held out)")
    return texts


def file_corpus(path: str | Path, model_dir: str | Path | None = None) -> Corpus:
    """A user's file: the last ceil(n / 10) texts held out, the rest fine-tuned on; no pretraining part."""
    texts = read_texts(Path(path))
    encode, vocab = _tokenizer(model_dir)
    n_held = max(1, math.ceil(len(texts) / 10))
    parts = {
        "finetune": torch.tensor([t for text in texts[:-n_held] for t in encode(text + "\n")], dtype=torch.int64),
        "heldout": torch.tensor([t for text in texts[-n_held:] for t in encode(text + "\n")], dtype=torch.int64),
    }
    parts["pretrain"] = parts["finetune"]
    return Corpus(name=Path(path).name, vocab_size=vocab, sample=_byte_sampler(parts), can_pretrain=False)


def _tokenizer(model_dir: str | Path | None) -> tuple[Callable[[str], list[int]], int]:
    """The model directory's tokenizer.json (local, via `tokenizers`), else UTF-8 bytes (vocab 256)."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        return (lambda text: tok.encode(text).ids), tok.get_vocab_size()
    return (lambda text: list(text.encode("utf-8"))), BYTE_VOCAB


def corpus_vocab(kind: str, path: str | None = None, model_dir: str | None = None, seq_len: int = 1) -> int:
    """Token ids a corpus can emit. A file is read and tokenized here (a bad format, or a part shorter than
    seq_len + 1 tokens, raises) so that a suite fails before any point runs."""
    if kind == "synthetic":
        return SYNTHETIC_VOCAB
    if kind == "file" and path:
        corpus = file_corpus(path, model_dir)
        for part in ("finetune", "heldout"):
            try:
                corpus.sample(part, torch.Generator().manual_seed(0), 1, seq_len)
            except BenchInputError as e:
                raise BenchInputError(f"corpus file {path}: {e} (the last tenth of its texts is held out); give a longer file or a smaller seq_len") from None
        return corpus.vocab_size
    return BYTE_VOCAB


def make_corpus(kind: str, seed: int, path: str | None = None, model_dir: str | None = None) -> Corpus:
    """The corpus of an accuracy point: 'synthetic' (per seed), 'stdlib', or 'file' (needs `path`)."""
    if kind == "synthetic":
        return synthetic_corpus(seed)
    if kind == "stdlib":
        return stdlib_corpus()
    if kind == "file":
        if not path:
            raise BenchInputError("corpus = \"file\" needs corpus_path = \"...\" (a .jsonl or text file)")
        return file_corpus(path, model_dir)
    raise BenchInputError(f"unknown corpus {kind!r}; allowed: {', '.join(CORPUS_KINDS)}")
