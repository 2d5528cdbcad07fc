"""Market-1501-layout datasets, transforms, samplers and the synthetic data generator."""
