"""Names shared by the curvature core, its files and its logs.

The keys below are the only spelling of the factor names: files, logs and callbacks import them from here.
"""

from typing import Literal

ACTIVATION_COVARIANCE = "activation_covariance"
GRADIENT_COVARIANCE = "gradient_covariance"
ACTIVATION_EIGENVALUES = "activation_eigenvalues"
ACTIVATION_EIGENVECTORS = "activation_eigenvectors"
GRADIENT_EIGENVALUES = "gradient_eigenvalues"
GRADIENT_EIGENVECTORS = "gradient_eigenvectors"

FACTOR_KEYS = (ACTIVATION_COVARIANCE, GRADIENT_COVARIANCE)
EIGEN_KEYS = (ACTIVATION_EIGENVALUES, ACTIVATION_EIGENVECTORS, GRADIENT_EIGENVALUES, GRADIENT_EIGENVECTORS)

FisherType = Literal["true", "empirical"]
FISHER_TYPES: tuple[str, ...] = ("true", "empirical")

#: Label value that marks a position without a target (the Hugging Face convention).
IGNORE_INDEX = -100

#: Version of the on-disk format of factor and eigen files; bump on incompatible changes.
FORMAT_VERSION = 1

#: Header metadata key of safetensors files written by this package.
METADATA_KEY = "lightning_curv"

#: ``kind`` of the file that holds the raw sums and counts of an unfinished collection (for resuming).
ACCUMULATOR_STATE = "accumulator_state"
