"""Datasets: sources, Parquet preparation with a manifest, and readers."""
