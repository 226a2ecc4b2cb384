"""Checkpoint -> FID: sampling for evaluation, feature extractors, reference statistics, the job."""
