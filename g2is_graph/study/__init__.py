"""The selection-quality study: the paper's Table 1 at small scale as one resumable grid."""
