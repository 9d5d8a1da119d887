"""pneumoflag device side: decode, score and publish. Needs no TensorFlow."""
__version__ = "0.1.0"
