"""`python -m jova_jax.plan --config=... --mesh=...`: the planner of jova_jax/tools/plan.py, under
the command the README, the Makefile and docs/scaling.md use."""
from jova_jax.tools.plan import main

if __name__ == "__main__":
  main()
