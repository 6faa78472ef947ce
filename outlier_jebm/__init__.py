"""jebm-od: image anomaly detection with a joint latent-space EBM prior on a multi-layer generator."""

__version__ = "0.1.0"
