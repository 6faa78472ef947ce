"""What crosses the library's edge: request payloads turned into images or vectors, and the MLflow pyfunc model.

``payload`` reads JSON items, raw bytes, arrays and DataFrames into scorable items and turns scored
tables back into predictions; the HTTP server, the pyfunc model and Spark all use it.
``pyfunc_model.py`` is the *model from code* that ``registry`` logs (MLflow reads it as a file).
"""
