"""Explain: which pixels of a stamp made its score (occlusion, saliency, integrated gradients), as arrays and pictures."""
