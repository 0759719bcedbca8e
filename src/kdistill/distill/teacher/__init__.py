"""Teacher sources: where the teacher's outputs for a batch come from — the live teacher (eager
or sped up, `speedup`), outputs in memory and stored outputs (`store`), generated sequences.

The package itself imports nothing, so that any of its modules can be imported alone.
"""
