"""Peer benchmark: our top-k trainer against sparsify, SAELens and dictionary_learning, each in its own process."""
