"""The text-encoder interface (docs/design.md section 5): prompts -> token-level embeddings
and mask."""
from __future__ import annotations

import abc

import jax
import numpy as np


class TextEncoder(abc.ABC):
  name: str
  width: int

  @abc.abstractmethod
  def tokenize(self, texts: list[str], max_length: int | None = None):
    """(ids (B,L) int32, mask (B,L) bool), right-padded to the longest prompt or max_length."""

  @abc.abstractmethod
  def embed(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The encoder network: (B,L,width) last hidden states (jitted; follows the ids' sharding)."""

  def encode(self, texts: list[str], max_length: int | None = None,
             sharding=None) -> tuple[np.ndarray, np.ndarray]:
    """(emb (B,L,width) float32, mask (B,L) bool): token-level last hidden states.

    L is the longest prompt's token count, or max_length when given (longer prompts are cut).
    sharding (a jax Sharding of the batch axis) spreads the prompts over devices, as
    data_prep.encode does over a host's accelerators; None: the default device.
    """
    ids, mask = self.tokenize(texts, max_length)
    placed = [jax.device_put(x, sharding) for x in (ids, mask)]
    return np.asarray(self.embed(*placed), np.float32), mask

  def config(self) -> dict:
    """JSON-able description stored in the dataset metadata."""
    return dict(name=self.name, width=self.width)


def structured_prompt(captions: dict) -> str:
  """The structured prompt both towers read (docs/design.md section 1): training captions
  (data_prep) and sampling prompts (jova_jax.sampling) are written by this one function."""
  return (f"<Video Caption>: {captions['video_caption'].strip()} "
          f"<Audio Caption>: {captions['audio_caption'].strip()} "
          f"<Transcript>: {captions['transcript'].strip()}")


def pad_encodings(encodings, max_length: int | None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """tokenizers Encodings -> (ids (B,L) int32, mask (B,L) bool), L = max_length or the longest."""
  length = max_length or max(len(e.ids) for e in encodings)
  ids = np.full((len(encodings), length), pad_id, np.int32)
  mask = np.zeros((len(encodings), length), bool)
  for i, e in enumerate(encodings):
    ids[i, :len(e.ids)] = e.ids
    mask[i, :len(e.ids)] = True
  return ids, mask
