"""Sampling: the pipeline that runs requests, the samplers, captured step graphs, image output."""
