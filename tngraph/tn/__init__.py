"""Tensor-network factorizations of weight matrices."""
from .lowrank import decompose_lowrank, lowrank_params, rank_for_budget
from .whitening import Whitening, whitening_from_gram

__all__ = ["Whitening", "decompose_lowrank", "lowrank_params", "rank_for_budget", "whitening_from_gram"]
