"""LightningModule, Trainer factory, callbacks, and the train stage."""
