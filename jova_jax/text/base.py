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
