"""Packed speculative-decoding masks.

With speculative decoding each request brings ``q_seq_len`` new query tokens, whose K/V already sit
at the end of the request's KV sequence: positions ``seq_len - q_seq_len .. seq_len - 1``.  The mask
says which of those new positions each query token sees; the request's history (every position
before ``seq_len - q_seq_len``) is always visible.

Layout (the kernel contract, the same bytes as FlashInfer 0.6.0's XQA):

* 32-bit words ``[batch, q_seq_len, ceil(q_seq_len / 32)]``.
* Bit ``j`` of row ``i`` -- word ``j // 32``, bit ``j % 32``, least significant bit first -- set
  means query token ``i`` sees KV position ``seq_len - q_seq_len + j``.  Padding bits of the last
  word (``j >= q_seq_len``) are ignored.

torch supports few operators on ``uint32``, so the builders return ``torch.int32`` tensors holding
the uint32 bit patterns (a word with bit 31 set is a negative int32); ``words.view(torch.uint32)``
reinterprets them without a copy, and every function here accepts either dtype.  FlashInfer takes
the same bytes viewed as ``uint16`` with twice the columns (:func:`as_flashinfer_mask`).
"""

from __future__ import annotations

from ._torch import torch

WORD_BITS = 32
WORD_DTYPES = (torch.int32, torch.uint32)


def words_per_row(q_seq_len: int) -> int:
    """Mask words per query token: ``ceil(q_seq_len / 32)``."""
    _check_positive_int("q_seq_len", q_seq_len)
    return -(-q_seq_len // WORD_BITS)


def validate_mask(words: torch.Tensor, q_seq_len: int, *, batch: int | None = None, name: str = "mask") -> None:
    """Raise TypeError/ValueError, naming ``name``, unless ``words`` is a packed mask for ``q_seq_len``."""
    if not isinstance(words, torch.Tensor) or words.dtype not in WORD_DTYPES:
        raise TypeError(f"{name} must be an int32 or uint32 tensor of packed mask words, got {_describe(words)}")
    expected = [batch if batch is not None else "batch", q_seq_len, words_per_row(q_seq_len)]
    if (words.dim() != 3 or words.shape[1:] != (q_seq_len, expected[2])
            or (batch is not None and words.shape[0] != batch)):
        raise ValueError(f"{name} must have shape [batch, q_seq_len, ceil(q_seq_len/32)] = {expected}, "
                         f"got {list(words.shape)}")


def pack_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``[batch, q_seq_len, q_seq_len]`` visibility matrix into int32 mask words.

    ``allowed[b, i, j]`` says whether query token ``i`` of request ``b`` sees the ``j``-th new token.
    """
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        raise TypeError(f"allowed must be a torch.bool tensor, got {_describe(allowed)}")
    if allowed.dim() != 3 or allowed.shape[1] != allowed.shape[2] or allowed.shape[1] == 0:
        raise ValueError(f"allowed must have shape [batch, q_seq_len, q_seq_len] with q_seq_len >= 1, "
                         f"got {list(allowed.shape)}")
    batch, q_seq_len, _ = allowed.shape
    n_words = words_per_row(q_seq_len)
    bits = torch.nn.functional.pad(allowed.to(torch.int64), (0, n_words * WORD_BITS - q_seq_len))
    weights = 2 ** torch.arange(WORD_BITS, dtype=torch.int64, device=allowed.device)
    words = (bits.view(batch, q_seq_len, n_words, WORD_BITS) * weights).sum(-1)
    # Values are in [0, 2**32); map them to the int32 with the same bit pattern.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_mask(words: torch.Tensor, q_seq_len: int) -> torch.Tensor:
    """The boolean ``[batch, q_seq_len, q_seq_len]`` visibility matrix of packed mask words."""
    validate_mask(words, q_seq_len, name="words")
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    # Arithmetic shifts of negative words bring in ones at the top; `& 1` keeps only the wanted bit.
    bits = (words.view(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :q_seq_len].bool()


def causal_mask(batch: int, q_seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Packed mask where new token ``i`` sees new tokens ``0 .. i`` (a chain of drafted tokens)."""
    _check_positive_int("batch", batch)
    _check_positive_int("q_seq_len", q_seq_len)
    allowed = torch.ones(q_seq_len, q_seq_len, dtype=torch.bool, device=device).tril()
    return pack_mask(allowed.expand(batch, q_seq_len, q_seq_len))


def random_tree_mask(batch: int, q_seq_len: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Packed mask of a random token tree per request (speculative decoding with tree drafts).

    Token ``i``'s parent is a uniformly random earlier new token or the root (the request's
    history); a token sees itself and its ancestors.  Siblings and cousins are hidden from each
    other, so the pattern is not causal in general.  ``generator`` must be a CPU generator.
    """
    _check_positive_int("batch", batch)
    _check_positive_int("q_seq_len", q_seq_len)
    allowed = torch.zeros(batch, q_seq_len, q_seq_len, dtype=torch.bool)
    for token in range(q_seq_len):
        # -1 stands for the root: the token hangs directly off the history.
        parent = torch.randint(-1, token, (batch,), generator=generator)
        children = (parent >= 0).nonzero().squeeze(1)
        allowed[children, token] = allowed[children, parent[children]]
        allowed[:, token, token] = True
    return pack_mask(allowed).to(device)


def as_flashinfer_mask(words: torch.Tensor) -> torch.Tensor:
    """The same bytes as FlashInfer 0.6.0 takes them: uint16 ``[batch, q_seq_len, 2 * ceil(q_seq_len/32)]``."""
    if not isinstance(words, torch.Tensor) or words.dtype not in WORD_DTYPES:
        raise TypeError(f"words must be an int32 or uint32 tensor of packed mask words, got {_describe(words)}")
    if words.dim() != 3:
        raise ValueError(f"words must have shape [batch, q_seq_len, ceil(q_seq_len/32)], got {list(words.shape)}")
    return words.contiguous().view(torch.uint16)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"
