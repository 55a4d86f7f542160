"""The text networks, plain PyTorch, no Ray: an LSTM classifier, an LSTM language model and a
small GPT (decoder-only transformer), plus the sampling loop both language models share.

Every model keeps the arguments that rebuild it in ``hparams`` (saved in its bundle).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from components.text.tokenizer import PAD_ID


class LSTMClassifier(nn.Module):
    """Embedding, a (bi)LSTM over the real tokens (packed: padding is never read), pooling
    over time, dropout and a linear head.

    Args:
        vocab_size: token ids are in ``[0, vocab_size)``; 0 pads.
        num_classes: output classes.
        embed: embedding width.
        hidden: LSTM units per direction.
        layers: stacked LSTM layers.
        bidirectional: read the text both ways.
        pooling: ``max`` or ``mean`` over the outputs of the real tokens, or ``last`` (the
            final state of each direction).
        dropout: dropout on the embeddings and before the head.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed: int = 128,
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = True,
        pooling: str = "max",
        dropout: float = 0.3,
    ):
        super().__init__()
        self.hparams = {
            "vocab_size": vocab_size,
            "num_classes": num_classes,
            "embed": embed,
            "hidden": hidden,
            "layers": layers,
            "bidirectional": bidirectional,
            "pooling": pooling,
            "dropout": dropout,
        }
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(
            embed,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) of padded ids (N, T) whose real lengths are ``lengths`` (N,)."""
        lengths = lengths.clamp(min=1)  # an empty text reads one pad token
        x = self.dropout(self.embedding(ids))
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, (h, _) = self.lstm(packed)
        if self.pooling == "last":
            directions = 2 if self.lstm.bidirectional else 1
            pooled = torch.cat([h[-d - 1] for d in range(directions)], dim=1)
        else:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
            real = (torch.arange(out.shape[1], device=out.device)[None] < lengths[:, None])[
                ..., None
            ]
            if self.pooling == "max":
                pooled = out.masked_fill(~real, float("-inf")).amax(1)
            else:
                pooled = (out * real).sum(1) / lengths[:, None].to(out.dtype)
        return self.head(self.dropout(pooled))


class LSTMLanguageModel(nn.Module):
    """A character/BPE LSTM language model: embedding, stacked LSTM, linear head.

    Args:
        vocab_size: ids are in ``[0, vocab_size)``.
        embed: embedding width.
        hidden: LSTM units.
        layers: stacked LSTM layers.
        dropout: between layers and before the head.
    """

    def __init__(
        self, vocab_size: int, embed: int = 128, hidden: int = 256, layers: int = 2, dropout=0.0
    ):
        super().__init__()
        self.hparams = {
            "arch": "lstm",
            "vocab_size": vocab_size,
            "embed": embed,
            "hidden": hidden,
            "layers": layers,
            "dropout": dropout,
        }
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(
            embed, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits (N, T, V) of every next token, and the LSTM state after the last one."""
        out, state = self.lstm(self.embedding(ids), state)
        return self.head(self.dropout(out)), state


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier ones."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        # The fused kernel (flash / memory-efficient on GPU) with the causal mask built in.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(n, t, c)))


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A small decoder-only transformer (nanoGPT's shape): token + learned position
    embeddings, pre-norm blocks, a final norm, and a head tied to the token embedding.

    Args:
        vocab_size: ids are in ``[0, vocab_size)``.
        context: the longest input (positions).
        layers: transformer blocks.
        heads: attention heads (``width`` must be divisible by it).
        width: the residual stream's width.
        dropout: on embeddings, attention and MLP outputs.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        layers: int = 4,
        heads: int = 4,
        width: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.hparams = {
            "arch": "gpt",
            "vocab_size": vocab_size,
            "context": context,
            "layers": layers,
            "heads": heads,
            "width": width,
            "dropout": dropout,
        }
        self.context = context
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.token.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init)
        # GPT-2's scaled init of the projections into the residual stream (depth-stable).
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits (N, T, V) of every next token (T <= context); no state (the signature is
        the LSTM's, so both models sample and score alike)."""
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"{t} tokens, more than the context of {self.context}")
        x = self.token(ids) + self.position(torch.arange(t, device=ids.device))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)), None


def build_lm(hparams: dict[str, Any]) -> nn.Module:
    """The language model ``hparams`` describe (``arch``: ``gpt`` or ``lstm``)."""
    kwargs = {k: v for k, v in hparams.items() if k != "arch"}
    return GPT(**kwargs) if hparams["arch"] == "gpt" else LSTMLanguageModel(**kwargs)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt: list[int],
    tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """``tokens`` ids drawn after ``prompt`` (ids), one at a time.

    The LSTM carries its state forward (one step per token); the GPT re-reads the last
    ``context`` ids. Draws come from a generator seeded by ``seed``, so the same call gives the
    same ids. ``temperature`` 0 takes the most likely token; ``top_k`` keeps the k most likely.
    """
    if not prompt:
        raise ValueError("the prompt holds no token")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    context = getattr(model, "context", None)
    ids = list(prompt)
    state = None
    feed = ids if context is None else ids[-context:]
    out: list[int] = []
    for _ in range(tokens):
        logits, state = model(torch.tensor([feed], device=device), state)
        logits = logits[0, -1].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cut = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cut, float("-inf"))
            probs = torch.softmax(logits, dim=0)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        ids.append(token)
        feed = [token] if context is None else ids[-context:]
    return out
