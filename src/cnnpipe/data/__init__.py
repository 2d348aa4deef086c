"""Data: sources -> prepared splits -> augmented train split -> in-memory batches."""
