"""A tiny character-level transformer language model for the Sophia / lr-robustness experiments.

Data: the Python standard library's ``pydoc_data.topics`` text (about 0.9 M characters, ships
with CPython, no download), a fixed 90/10 train/validation split of the character stream,
vocabulary from the train text plus one UNK id for unseen characters. Model: 2-layer
pre-LayerNorm transformer (d_model 64, 4 heads, MLP 4x, learned positions, causal mask),
hand-written attention (plain matmul + softmax, so double backward for Hessian-vector products
works on every backend). Context 64, random batches of 32 windows from a seeded generator, a
fixed evaluation set of validation windows.

Not run on its own; imported by ``sophia_lm.py`` and ``lr_robustness.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTEXT, BATCH, D_MODEL, HEADS, LAYERS = 64, 32, 64, 4, 2


class CharData:
    def __init__(self, split: float = 0.9, eval_windows: int = 256, eval_seed: int = 1234):
        from pydoc_data.topics import topics

        text = "\n".join(topics.values())
        n = int(len(text) * split)
        train_text, val_text = text[:n], text[n:]
        chars = sorted(set(train_text))
        self.stoi = {c: i + 1 for i, c in enumerate(chars)}  # 0 = UNK
        self.vocab = len(chars) + 1
        enc = lambda s: torch.tensor([self.stoi.get(c, 0) for c in s], dtype=torch.long)
        self.train, self.val = enc(train_text), enc(val_text)
        self.n_chars = len(text)
        g = torch.Generator().manual_seed(eval_seed)
        starts = torch.randint(0, len(self.val) - CONTEXT - 1, (eval_windows,), generator=g)
        self.eval_x, self.eval_y = self._windows(self.val, starts)

    @staticmethod
    def _windows(stream, starts):
        idx = starts[:, None] + torch.arange(CONTEXT + 1)
        w = stream[idx]
        return w[:, :-1], w[:, 1:]

    def batch(self, gen: torch.Generator, batch: int = BATCH):
        starts = torch.randint(0, len(self.train) - CONTEXT - 1, (batch,), generator=gen)
        return self._windows(self.train, starts)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        sh = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
        att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab: int, d: int = D_MODEL, heads: int = HEADS, layers: int = LAYERS, context: int = CONTEXT):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for b in self.blocks:
            h = b(h, self.mask)
        return self.head(self.ln(h))


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, data: CharData) -> float:
    """Validation loss in nats/char on the fixed evaluation windows."""
    was = model.training
    model.eval()
    loss = sum(lm_loss(model(data.eval_x[i:i + 64]), data.eval_y[i:i + 64]).item() * len(data.eval_x[i:i + 64])
               for i in range(0, len(data.eval_x), 64)) / len(data.eval_x)
    model.train(was)
    return loss
