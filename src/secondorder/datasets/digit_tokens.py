r"""A tiny BERT-like transformer that reads scikit-learn's 8x8 digits as 8 row-tokens.

Each image (1797 of them, shipped with scikit-learn, so nothing is downloaded) is a sequence of
8 tokens, its rows, each a vector of 8 pixel values. :func:`load_digit_tokens` splits the images
into a stratified train and test set (seeded, 80/20 by default: 1437 / 360) and standardises every
pixel with the training statistics (a pixel constant on the training set gets scale 1).

:class:`DigitTransformer` is the smallest network with every part of a BERT encoder that post-training
quantization cares about: a token embedding ``Linear(8, d)``, a learned position embedding,
pre-LayerNorm encoder blocks (multi-head self-attention with its own ``q``, ``k``, ``v`` and
``out`` Linear projections, then an MLP ``Linear(d, 4d) - GELU - Linear(4d, d)``, each in a residual
branch), a final LayerNorm, mean pooling over the tokens and a ``Linear(d, 10)`` head. The attention
is written with plain ``nn.Linear`` layers (not ``nn.MultiheadAttention``, whose output projection
weight is read directly by its forward and so cannot be wrapped by a quantizer), so every matrix of
the network is a Linear layer listed by :func:`~secondorder.quant.quantizers.quantizable_layers`; the
position embedding is a plain parameter named ``position`` (not a layer's ``weight``), so it is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder.validation import positive_finite, positive_int

__all__ = ["DigitTransformer", "TrainedDigitTransformer", "load_digit_tokens", "train_digit_transformer"]

TOKENS = 8
FEATURES = 8
CLASSES = 10


def load_digit_tokens(split_seed: int = 0, test_size: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [N, 8, 8], y_train [N], x_test [M, 8, 8], y_test [M])``, float32 / int64.

    A stratified split of the 1797 digits (``train_test_split(..., stratify=y, random_state=split_seed)``;
    1437 / 360 at the default ``test_size``), every pixel standardised with the training mean and
    standard deviation (``StandardScaler``), each image reshaped to its 8 rows (the tokens).
    Raises a clear error if scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:  # pragma: no cover - an extra of the experiments
        raise ImportError("the digit tokens need scikit-learn (its 8x8 digits): pip install scikit-learn") from err

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=test_size, random_state=split_seed,
                                          stratify=d.target)
    scaler = StandardScaler().fit(xtr)  # zero-variance pixels get scale 1
    x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32).reshape(-1, TOKENS, FEATURES)
    y = lambda a: torch.tensor(a, dtype=torch.long)
    return x(xtr), y(ytr), x(xte), y(yte)


class SelfAttention(nn.Module):
    """Multi-head self-attention from four plain Linear layers ``q``, ``k``, ``v`` and ``out``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, dim = x.shape
        split = lambda z: z.reshape(b, t, self.heads, dim // self.heads).transpose(1, 2)  # (b, heads, t, dh)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, dim))


class EncoderBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DigitTransformer(nn.Module):
    """Token embedding ``Linear(8, d)`` + learned positions, pre-LN blocks, LayerNorm, mean pool, ``Linear(d, 10)``.

    Input ``[N, 8, 8]`` (8 tokens of 8 features; ``[N, 64]`` is reshaped), output ``[N, 10]`` logits.
    With the defaults (``dim=32``, ``heads=4``, ``depth=2``): 14 Linear layers (``embed``,
    ``blocks.{0,1}.attn.{q,k,v,out}``, ``blocks.{0,1}.fc{1,2}``, ``head``), 26,346 parameters.
    """

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, mlp_ratio: int = 4):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(heads, "heads")
        positive_int(depth, "depth")
        positive_int(mlp_ratio, "mlp_ratio")
        self.embed = nn.Linear(FEATURES, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, TOKENS, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x.reshape(x.shape[0], TOKENS, FEATURES)) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class TrainedDigitTransformer:
    """The trained network (eval mode), its training data, test accuracy and the training recipe."""

    model: DigitTransformer
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    test_accuracy: float
    train_loss: float
    recipe: str


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_digit_transformer(
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    progress: bool = False,
) -> TrainedDigitTransformer:
    """Train :class:`DigitTransformer` (``dim=32``, 4 heads, 2 blocks) with Adam on the digit tokens.

    ``data`` defaults to :func:`load_digit_tokens` (split seed 0, the same split for every
    ``seed``). Initialisation and batch order come from ``seed`` in a forked RNG (the caller's
    global RNG is untouched). Adam at ``lr`` with a cosine decay to 0 over the ``epochs`` passes
    of shuffled batches of ``batch_size``. About 5 s for the default 30 epochs on one CPU thread;
    test accuracy 96-98 % (seeds 0-5: 96.1-97.8 %).
    """
    from tqdm import tqdm

    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    positive_finite(lr, "lr")
    xtr, ytr, xte, yte = data if data is not None else load_digit_tokens()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitTransformer()
        gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(xtr) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            schedule.step()
    for p in model.parameters():
        p.grad = None
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(xtr), ytr))
    recipe = (f"8x8 digits as 8 row-tokens ({len(xtr)} train / {len(xte)} test), DigitTransformer (d 32, 4 heads, "
              f"2 pre-LN blocks), Adam lr {lr:g} cosine to 0, batch {batch_size}, {epochs} epochs, seed {seed}")
    return TrainedDigitTransformer(model, (xtr, ytr), (xte, yte), _accuracy(model, xte, yte), train_loss, recipe)
