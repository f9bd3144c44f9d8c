"""The feature store on disk and the feature space a graph lives in."""
