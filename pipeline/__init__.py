"""Transfer learning on images: a frozen ImageNet CNN as a feature extractor,
an HDF5 feature cache, and scikit-learn heads trained on it.

The DVC stages in ``stages/`` are thin wrappers around this package.
"""

__version__ = "0.1.0"
