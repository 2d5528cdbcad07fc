"""Ranking code shared by training, evaluation and serving.

This package imports numpy (and faiss for galleries) but never torch or any other package of ours,
so the serving image can use it without the training stack.
"""
