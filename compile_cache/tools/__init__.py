"""Tools run from the command line or make (benchmarks); nothing here is imported at boot."""
