"""Training: the compiled step, the loop shared by `train` and `sweep`, data loading,
checkpoints, saved SAEs and their exports, the dry run and the benchmark.

Imports core, store, config, io and errors; never torch.
"""
