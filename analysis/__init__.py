"""Weight statistics and feature decorrelation of "Encourage or Inhibit Monosemanticity?
Revisit Monosemanticity from a Feature Decorrelation Perspective" (EMNLP 2024).

NumPy only (matplotlib for the plots): every function takes weights or activations as
arrays, so it works for any model; `extract/analysis_io.py` pulls the arrays out of
transformers checkpoints.
"""
