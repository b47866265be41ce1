"""Pretrain the encoder example's teacher on CPython's documentation.

    python examples/transformer/train.py [--size small|base] [--steps N] [--minutes M]
                                         [--out PATH] [--seed S] [--threads N]

Two objectives on the training segments of :mod:`data`, summed at every step:

* masked language modelling (BERT): 15 % of the real tokens are chosen, 80 % of those become
  ``[MASK]``, 10 % a random token, 10 % stay; a head (Linear-GELU-LayerNorm, then the token
  embedding transposed, i.e. tied) predicts them. The head is not part of ``Encoder`` and is
  not saved: the teacher file holds exactly ``Encoder.state_dict()``.
* contrastive (SimCSE): the pooled embeddings of the masked view and of a clean view of the
  same segment (each with its own dropout) must find each other among the batch (InfoNCE,
  temperature 0.05). Cheap to solve, but it spreads the embeddings over the sphere: after
  600 steps the mean cosine between test embeddings is 0.007 and their nearest neighbours
  survive 8-bit min-max weights (97.9 % agreement at a 1 - cosine of 3e-5). Measured
  against it: contrastive span prediction (the two halves of a segment as the pair, one
  forward instead of two; tried with GPT-2's scaled init of the residual projections) left
  the embeddings crowded after 800 steps of 64 segments (mean cosine 0.77;
  8-bit weights already changed 5 % of the nearest neighbours at a 1 - cosine of 3e-6), a
  brittle target for a compression metric.

Writes ``teacher.safetensors`` (metadata: size, steps, seed, vocabulary hash), ``vocab.json``
(the vocabulary, a record: ``data.py`` rebuilds it) and ``train.json`` (settings, loss curve,
test quality) into ``artifacts/examples/transformer-<size>/`` of the repository by default.
A run bounded by ``--steps`` is deterministic; one bounded by ``--minutes`` is not (how many
steps fit depends on the machine).
"""

from __future__ import annotations

import os

# On a machine shared with other jobs, OpenMP threads that spin while waiting for each other
# cost 4x the CPU time per step (measured: 4.5 CPU s/step with 2 spinning threads under a load
# of 6, 1.1 with one thread); sleeping waits cost little when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import corpus
import data
from encoder import FACTORIES, Encoder, n_params

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100  # cross_entropy's ignore_index: positions that are not MLM targets


def default_out(size: str) -> Path:
    return REPO / "artifacts" / "examples" / f"transformer-{size}" / "teacher.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    size: str = "small"
    # Budget: stop at `steps`, or after `minutes`, whichever comes first (None: no bound).
    # The learning-rate schedule follows the larger share of the budget used.
    steps: int | None = 600
    minutes: float | None = None
    batch_size: int = 32
    lr: float | None = None         # None: 1e-3 for small, 5e-4 for base
    weight_decay: float = 0.01
    warmup: float = 0.05            # share of the budget spent warming up linearly
    mask_prob: float = 0.15
    temperature: float = 0.05       # SimCSE's
    contrastive_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in FACTORIES:
            raise ValueError(f"size must be one of {sorted(FACTORIES)}, got {self.size!r}")
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes (or both)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"small": 1e-3, "base": 5e-4}[self.size]


class MLMHead(nn.Module):
    """BERT's prediction head: Linear-GELU-LayerNorm, then logits over the vocabulary through
    the (tied) token embedding matrix."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        d = encoder.cfg.d_model
        self.dense = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.embedding = encoder.tok  # tied: shares the encoder's weight tensor
        self.bias = nn.Parameter(torch.zeros(encoder.cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(m, d) token states -> (m, vocab) logits."""
        return F.linear(self.ln(F.gelu(self.dense(h))), self.embedding.weight, self.bias)


def mask_tokens(ids: torch.Tensor, attention_mask: torch.Tensor, *, prob: float,
                vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``ids`` (n, T). Returns the corrupted ids and the targets (n, T):
    the original id at chosen positions, ``IGNORE`` elsewhere. [CLS] and padding are never
    chosen."""
    real = attention_mask.bool().clone()
    real[:, 0] = False  # [CLS]
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & real
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(corpus.SPECIALS), vocab_size, ids.shape, generator=generator)
    out = torch.where(chosen & (roll < 0.8), torch.full_like(ids, corpus.MASK), ids)
    out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
    return out, targets


def batches(segs: Sequence[tuple[int, ...]], batch_size: int, *, generator: torch.Generator,
            group: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless padded batches (``input_ids``, ``attention_mask``): ``group`` batches' worth of
    random segments are sorted by length and cut into batches served in random order, so
    little of each batch is padding."""
    while True:
        perm = torch.randperm(len(segs), generator=generator).tolist()
        for lo in range(0, len(perm) - batch_size * group + 1, batch_size * group):
            chunk = sorted(perm[lo:lo + batch_size * group], key=lambda i: len(segs[i]))
            cut = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            for b in torch.randperm(len(cut), generator=generator).tolist():
                yield corpus.pad([segs[i] for i in cut[b]])


def losses(encoder: Encoder, head: MLMHead, ids: torch.Tensor, attention_mask: torch.Tensor,
           cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLM cross-entropy in nats per masked token, InfoNCE in nats per sequence) of a batch
    ``ids`` (n, T) under ``attention_mask`` (n, T).

    View A is the masked batch (MLM is scored on it), view B the clean batch; each forward
    draws its own dropout. A's and B's pooled embeddings of a sequence must find each other
    among the batch (SimCSE, with masking as extra noise).
    """
    masked, targets = mask_tokens(ids, attention_mask, prob=cfg.mask_prob,
                                  vocab_size=encoder.cfg.vocab_size, generator=generator)
    h = encoder.encode(masked, attention_mask)
    pick = targets != IGNORE
    mlm = F.cross_entropy(head(h[pick]), targets[pick])
    za = F.normalize(encoder.pool(h, attention_mask), dim=-1)
    zb = F.normalize(encoder(ids, attention_mask), dim=-1)
    logits = za @ zb.T / cfg.temperature
    labels = torch.arange(len(ids))
    con = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return mlm, con


def halves(inputs: dict[str, torch.Tensor], *, min_tokens: int = 10
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The first and second halves of the sequences of ``inputs`` that have at least
    ``min_tokens`` real tokens after [CLS], each as padded inputs with its own [CLS]."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lengths = mask.sum(1) - 1
    first, second = [], []
    for row in torch.nonzero(lengths >= min_tokens).flatten().tolist():
        tokens = ids[row, 1:1 + int(lengths[row])].tolist()
        first.append(tokens[:len(tokens) // 2])
        second.append(tokens[len(tokens) // 2:])
    (a_ids, a_mask), (b_ids, b_mask) = corpus.pad(first), corpus.pad(second)
    return ({"input_ids": a_ids, "attention_mask": a_mask},
            {"input_ids": b_ids, "attention_mask": b_mask})


@torch.no_grad()
def evaluate(encoder: Encoder, head: MLMHead, inputs: dict[str, torch.Tensor], *,
             mask_prob: float, seed: int = 1234) -> dict[str, float]:
    """Quality on held-out inputs (eval mode, fixed masking):

    ``mlm_accuracy``: percent of masked tokens predicted exactly; ``mlm_loss`` in nats;
    ``frequent_token_accuracy``: the same for always guessing the corpus's most frequent
    token (the floor); ``mean_cosine``: mean cosine between the pooled embeddings of two
    different sequences (near 1: crowded, near 0: spread); ``halves_retrieval_at_1``:
    percent of sequences (of >= 10 tokens) whose first half's embedding has the second half
    of the same sequence as its nearest cosine neighbour among all second halves (chance:
    1 / n, about 0.1 %; the untrained encoder's overlap of rare words already finds ~10 %).
    """
    encoder.eval()
    head.eval()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    gen = torch.Generator().manual_seed(seed)
    masked, targets = mask_tokens(ids, mask, prob=mask_prob, vocab_size=encoder.cfg.vocab_size,
                                  generator=gen)
    pick = targets != IGNORE
    logits = head(encoder.encode(masked, mask)[pick])
    z = F.normalize(encoder(ids, mask), dim=-1)
    n = len(z)
    mean_cosine = (float((z @ z.T).sum()) - n) / (n * (n - 1))
    first, second = halves(inputs)
    za = F.normalize(encoder(**first), dim=-1)
    zb = F.normalize(encoder(**second), dim=-1)
    hit = (za @ zb.T).argmax(1) == torch.arange(len(za))
    most_frequent = len(corpus.SPECIALS)  # ids after the specials are by descending frequency
    return {
        "mlm_accuracy": 100.0 * float((logits.argmax(1) == targets[pick]).float().mean()),
        "mlm_loss": float(F.cross_entropy(logits, targets[pick])),
        "frequent_token_accuracy": 100.0 * float((targets[pick] == most_frequent).float().mean()),
        "mean_cosine": mean_cosine,
        "halves_retrieval_at_1": 100.0 * float(hit.float().mean()),
        "halves_n": float(len(za)),
    }


def schedule(progress: float, warmup: float) -> float:
    """Learning-rate factor at ``progress`` in [0, 1] of the budget: linear warm-up, then
    cosine decay to 0."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))


def train(cfg: TrainConfig, *, log: bool = True) -> tuple[Encoder, dict[str, Any]]:
    """Train a teacher under ``cfg``; returns it (eval mode) and a JSON-able record.

    The caller's global torch RNG is left as it was (dropout draws from a forked copy).
    """
    t_start = time.perf_counter()
    segs = data.training_segments()
    test_inputs = data.split_inputs("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # parameter init and dropout
        encoder = FACTORIES[cfg.size]()
        head = MLMHead(encoder)
        gen = torch.Generator().manual_seed(cfg.seed)
        params = list(encoder.parameters()) + [p for n, p in head.named_parameters()
                                               if not n.startswith("embedding.")]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.learning_rate)
        untrained = evaluate(encoder, head, test_inputs, mask_prob=cfg.mask_prob)
        history: list[tuple[float, float]] = []
        t_loop, cpu_loop = time.perf_counter(), time.process_time()
        step, progress = 0, 0.0
        if log:
            print(f"transformer-{cfg.size}: {n_params(encoder):,} encoder parameters, "
                  f"{len(segs):,} training segments, {torch.get_num_threads()} threads",
                  flush=True)
        for ids, mask in batches(segs, cfg.batch_size, generator=gen):
            elapsed = time.perf_counter() - t_loop
            progress = max(step / cfg.steps if cfg.steps else 0.0,
                           elapsed / (60 * cfg.minutes) if cfg.minutes else 0.0)
            if progress >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = cfg.learning_rate * schedule(progress, cfg.warmup)
            encoder.train()
            head.train()
            mlm, con = losses(encoder, head, ids, mask, cfg, gen)
            opt.zero_grad(set_to_none=True)
            (mlm + cfg.contrastive_weight * con).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append((mlm.item(), con.item()))
            step += 1
            if log and (step % 100 == 0 or step == 1):
                print(f"  step {step:5d}  mlm {history[-1][0]:.3f}  contrastive "
                      f"{history[-1][1]:.3f}  {elapsed / max(step - 1, 1):.2f} s/step",
                      flush=True)
        train_s = time.perf_counter() - t_loop
        cpu_s = time.process_time() - cpu_loop
        quality = evaluate(encoder, head, test_inputs, mask_prob=cfg.mask_prob)
    encoder.eval()
    record = {
        "config": asdict(cfg), "steps_done": step, "encoder_parameters": n_params(encoder),
        "train_seconds": round(train_s, 1),
        "seconds_per_step": round(train_s / max(step, 1), 3),
        # CPU seconds of this process (all threads) per step: less sensitive than wall time
        # to other programs sharing the cores.
        "cpu_seconds_per_step": round(cpu_s / max(step, 1), 3),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "threads": torch.get_num_threads(), "loss_curve": loss_curve(history),
        "test": quality, "test_untrained": untrained, "python": platform.python_version(),
        "vocab_sha256": corpus.vocab_sha256(corpus.vocab()),
        "corpus_sha256": corpus.corpus_sha256(corpus.documents()),
    }
    return encoder, record


def loss_curve(history: Sequence[tuple[float, float]], points: int = 10) -> list[dict[str, Any]]:
    """Mean losses over ``points`` equal windows of the run: [{steps, mlm, contrastive}]."""
    out = []
    n = len(history)
    for k in range(min(points, n)):
        lo, hi = k * n // points, (k + 1) * n // points
        window = history[lo:hi] or history[lo:lo + 1]
        out.append({"steps": f"{lo + 1}-{max(hi, lo + 1)}",
                    "mlm": round(sum(m for m, _ in window) / len(window), 3),
                    "contrastive": round(sum(c for _, c in window) / len(window), 3)})
    return out


def save(encoder: Encoder, record: dict[str, Any], out: Path) -> None:
    """Write the teacher weights, ``vocab.json`` and ``train.json`` into ``out``'s folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"example": "transformer", "size": record["config"]["size"],
            "steps": str(record["steps_done"]), "seed": str(record["config"]["seed"]),
            "vocab_sha256": record["vocab_sha256"], "python": record["python"]}
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out), metadata=meta)
    (out.parent / "vocab.json").write_text(json.dumps(
        {"tokens": list(corpus.vocab()), "vocab_sha256": record["vocab_sha256"],
         "corpus_sha256": record["corpus_sha256"], "python": record["python"],
         "note": "a record: data.py rebuilds this vocabulary from the corpus"}) + "\n")
    (out.parent / "train.json").write_text(json.dumps(record, indent=1) + "\n")


def ensure_teacher(path: Path | str | None = None, *, size: str = "small", steps: int = 200,
                   seed: int = 0) -> Path:
    """A teacher at ``path`` (default: the repository's artifacts folder), trained for
    ``steps`` only when the file is missing or was trained on another vocabulary (another
    CPython version). Returns the path. The small encoder takes ~0.8 CPU s per step plus
    ~30 CPU s of corpus building and evaluation: 200 steps are ~3 CPU minutes and give a
    trained (MLM loss below the unigram entropy), well-spread embedding."""
    path = Path(path) if path is not None else default_out(size)
    if path.is_file() and data.teacher_vocab_sha256(path) == corpus.vocab_sha256(corpus.vocab()):
        return path
    encoder, record = train(TrainConfig(size=size, steps=steps, seed=seed), log=False)
    save(encoder, record, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(FACTORIES), default="small")
    parser.add_argument("--steps", type=int, default=None,
                        help="step budget (default 600 unless --minutes is given)")
    parser.add_argument("--minutes", type=float, default=None, help="time budget")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, default=None,
                        help="teacher file (default artifacts/examples/transformer-<size>/"
                             "teacher.safetensors in the repository)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None or args.minutes is not None else TrainConfig.steps
    cfg = TrainConfig(size=args.size, steps=steps, minutes=args.minutes,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = args.out or default_out(args.size)
    encoder, record = train(cfg)
    save(encoder, record, out)
    print("loss curve (mean per tenth of the run):")
    for row in record["loss_curve"]:
        print(f"  steps {row['steps']:>11}  mlm {row['mlm']:.3f}  contrastive "
              f"{row['contrastive']:.3f}")
    for name, q in (("untrained", record["test_untrained"]), ("trained", record["test"])):
        print(f"test, {name:>9}: MLM accuracy {q['mlm_accuracy']:.1f} % (most frequent "
              f"token {q['frequent_token_accuracy']:.1f} %), MLM loss {q['mlm_loss']:.3f}, "
              f"mean cosine {q['mean_cosine']:.3f}, "
              f"halves retrieval@1 {q['halves_retrieval_at_1']:.1f} % of "
              f"{q['halves_n']:.0f}")
    print(f"{record['steps_done']} steps in {record['train_seconds']:.0f} s "
          f"({record['seconds_per_step']:.2f} s/step, {record['cpu_seconds_per_step']:.2f} "
          f"CPU s/step on {record['threads']} threads), "
          f"{record['encoder_parameters']:,} parameters -> {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
