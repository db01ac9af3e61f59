"""Developer tools run by hand (comparisons, measurements); never imported by the trainer."""
