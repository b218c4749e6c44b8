"""One module per trainer; each trains on identical activations and prints one JSON line (see `common`)."""
