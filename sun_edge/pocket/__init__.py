"""Pocket SD: a synthetic captioned world, its attribute classifier, and small SD-architecture models trained on it."""
