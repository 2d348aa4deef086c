"""LightningModule, Trainer factory, callbacks, resumable checkpoints, and the fit's history (curves)."""
