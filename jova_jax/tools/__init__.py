"""Tools: the planner, the benchmarks and other commands beside training and sampling."""
