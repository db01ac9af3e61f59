"""`python -m jova_jax.bench {model|train|sample|codecs} --config=...`: the benchmarks of
jova_jax/tools/bench.py, under the command the README and docs/performance.md use."""
from jova_jax import cli
from jova_jax.tools.bench import main

if __name__ == "__main__":
  cli.run(main)
