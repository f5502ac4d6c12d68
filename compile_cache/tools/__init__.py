"""Tools around the runtime: the benchmark, its per-boot process, the profiler and the Cog-runtime helper.

Nothing on the runtime path (setup, restore, upload) imports this package; ``tests/test_layout.py`` checks that.
"""
