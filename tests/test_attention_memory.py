"""The backward pass of chunked and ring attention keeps O(L x chunk) temporaries, not O(L^2 / chunk).

Compile only (abstract inputs): cheap. `python -m jova_jax.model.attention_memory` prints the
16k -> 32k figures quoted in docs/scaling.md.
"""
import pytest

from jova_jax.model.attention_memory import backward_temp_bytes

# A backward pass linear in the sequence doubles; one that keeps a softmax state per key block
# (the autodiff of the online softmax) grew 2.4-2.5x from 8k to 16k tokens.
MAX_GROWTH = 2.2


@pytest.mark.parametrize("strategy", ["none", "ring"])
def test_backward_temporaries_grow_linearly(strategy):
  small, large = (backward_temp_bytes(strategy, length) for length in (8192, 16384))
  assert large / small <= MAX_GROWTH, (small, large)
