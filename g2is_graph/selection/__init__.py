"""Selection: core knowledge (PCA), the gradient walk, baselines, runs, diagnostics and explanations."""
