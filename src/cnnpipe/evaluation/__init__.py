"""Test-split metrics (torchmetrics), reports and plots."""
