"""Plain PyTorch reference for one sparse self-attention call: exact attention restricted to the kept blocks.

Independent of the kernels: it expands the block mask of a selection to a token mask and runs float64 SDPA on it,
so a test can check that the sparse output is attention over exactly the blocks the selection lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_positions(seq: int, text: int, text_first: bool) -> torch.Tensor:
    """Token positions of the text in the original sequence: the first ``text`` tokens, or the last."""
    return torch.arange(text) if text_first else torch.arange(seq - text, seq)


def attended_order(seq: int, text: int, text_first: bool) -> torch.Tensor:
    """The order the block selection sees without tile reordering: image tokens first, then the text tokens."""
    texts = text_positions(seq, text, text_first)
    is_text = torch.zeros(seq, dtype=torch.bool)
    is_text[texts] = True
    return torch.cat([torch.arange(seq)[~is_text], texts])


def token_mask(block_mask: torch.Tensor, block_size: int, seq_q: int, seq_k: int) -> torch.Tensor:
    """(B, H, NQ, NK) block mask -> (B, H, seq_q, seq_k) token mask (tails of the last blocks cut off)."""
    expanded = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return expanded[..., :seq_q, :seq_k]


def block_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    order: torch.Tensor,
    key_length: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T) v over the kept blocks only, in float64, output in the original token order.

    ``q, k, v``: (B, H, S, D) in the original order; ``block_mask``: (B, H, NQ, NK) over the attended order
    ``x[..., order, :]``; keys at or past ``key_length`` (attended order) are padding and never attended.
    """
    seq = q.shape[-2]
    qo, ko, vo = (t.double()[:, :, order] for t in (q, k, v))
    mask = token_mask(block_mask.bool(), block_size, seq, seq).clone()
    if key_length is not None:
        mask[..., key_length:] = False
    out = F.scaled_dot_product_attention(qo, ko, vo, attn_mask=mask, scale=scale)
    restored = torch.empty_like(out)
    restored[:, :, order] = out
    return restored
