"""After training: predict on raw images (arrays or encoded files) with a saved or registered model.

`images` turns what a caller sends into the uint8 batches the network was trained on, `predictor` runs the
network, `predict` is the folder -> predictions/<folder>.csv command. No mlflow here: the MLflow pyfunc wrapper lives in
`cnnpipe.tracking.pyfunc_model` and uses `predictor`; registered models are loaded through `cnnpipe.tracking`.
"""
