"""Sampling room: prompts, loading a run, the jitted ODE sampler, its solvers, batch generation."""
