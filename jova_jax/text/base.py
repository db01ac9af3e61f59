"""The text-encoder interface (DESIGN 5): prompts -> token-level embeddings + mask."""
from __future__ import annotations

import abc

import numpy as np


class TextEncoder(abc.ABC):
  name: str
  width: int

  @abc.abstractmethod
  def encode(self, texts: list[str],
             max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(emb (B,L,width) float32, mask (B,L) bool): token-level last hidden states.

    L is the longest prompt's token count, or max_length when given (longer prompts are cut).
    """

  def config(self) -> dict:
    """JSON-able description stored in the dataset metadata."""
    return dict(name=self.name, width=self.width)


def pad_encodings(encodings, max_length: int | None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """tokenizers Encodings -> (ids (B,L) int32, mask (B,L) bool), L = max_length or the longest."""
  length = max_length or max(len(e.ids) for e in encodings)
  ids = np.full((len(encodings), length), pad_id, np.int32)
  mask = np.zeros((len(encodings), length), bool)
  for i, e in enumerate(encodings):
    ids[i, :len(e.ids)] = e.ids
    mask[i, :len(e.ids)] = True
  return ids, mask
