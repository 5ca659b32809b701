"""Trainers, one algorithm per module with its config dataclass beside it (``pretrain``: flow matching / BC)."""
