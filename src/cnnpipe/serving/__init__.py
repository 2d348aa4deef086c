"""After training: predict on raw images (arrays or encoded files) with a saved or registered model.

`predict` is the folder -> predictions/<folder>.csv command. What it builds on sits lower, shared with the MLflow
pyfunc model: `cnnpipe.data.inputs` turns what a caller sends into the uint8 batches the network was trained on,
`cnnpipe.models.predictor` runs the network. No mlflow here: registered models are loaded through `cnnpipe.tracking`.
"""
