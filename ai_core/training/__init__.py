"""Training of the node's models (VLP, segmentation) on phantoms or on real data from disk."""
