"""Text encoders behind one interface (docs/design.md section 5), chosen by config.text.encoder.

get_text_encoder(config) builds the named encoder and refuses one whose width differs from
config.text.width. `weights_dir` (default config.weights_dir; '' = the built-in source) is the
folder its weight files are read from.
"""
from __future__ import annotations

from jova_jax.text.base import TextEncoder
from jova_jax.text.minilm import MiniLMEncoder
from jova_jax.text.t5 import T5Encoder

# name -> factory(weights_dir or None, width): T5 takes the width to refuse a mismatch from its
# config.json before reading (possibly 10 GB of) weights.
TEXT_ENCODERS = {
    "minilm": lambda weights_dir, width: MiniLMEncoder(weights_dir),
    "t5": lambda weights_dir, width: T5Encoder(weights_dir, width=width),
}


def get_text_encoder(config, weights_dir: str | None = None) -> TextEncoder:
  name = config.text.encoder
  if name not in TEXT_ENCODERS:
    raise ValueError(f"text.encoder={name!r} is not a known text encoder; known: "
                     f"{', '.join(sorted(TEXT_ENCODERS))}")
  if weights_dir is None:
    weights_dir = config.get("weights_dir", "")
  encoder = TEXT_ENCODERS[name](weights_dir or None, config.text.width)
  if encoder.width != config.text.width:
    raise ValueError(f"text.width={config.text.width} in the config, but the {name!r} text "
                     f"encoder has width={encoder.width}")
  return encoder


__all__ = ["TextEncoder", "MiniLMEncoder", "get_text_encoder"]
