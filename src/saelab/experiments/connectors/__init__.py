"""Feature connectors ("Learning Interpretable Features with Sparse Auto-Encoders"): sparse maps between the SAE
features of consecutive sites, on an MNIST MLP (`connectors-mnist`, `run_mnist`) and on one MLP block of a language
model (`connectors-lm`, `run_lm`)."""
