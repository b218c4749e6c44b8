"""saelab: train and dissect sparse autoencoders on the activations of real neural networks."""

__version__ = "0.1.0"
