"""Data sources and the grain input pipeline."""
