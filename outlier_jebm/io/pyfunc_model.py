"""The MLflow pyfunc model of jebm-od, logged as a *model from code* (nothing is pickled).

``mlflow models serve -m <uri> --env-manager local`` answers ``/invocations`` with it;
``mlflow.pyfunc.spark_udf`` runs it on Spark. Inputs (see ``outlier_jebm.io.payload``):

- a DataFrame of S*S numeric pixel columns (``dataframe_split`` with 784 columns for MNIST),
  or S*S*3 for a colour model (``model.channels: 3``; pixels in H, W, C order),
- a DataFrame with a column ``pixels`` of arrays (S*S or S*S*3 values), or a column ``path``
  of image files (read on the host that runs the model; ``JEBM_OD_READ_PATHS=0`` in its
  environment turns that off, and each such row is an error),
- an array (``inputs``) of shape (N, S*S) or (N, S, S), or (N, S*S*3) or (N, S, S, 3);
- for a vector model (``model.data_kind: vector``): d numeric columns (picked by name when they
  include the columns of the table it was fitted on, else taken in order), one column of arrays of
  d numbers (Spark's ``pixels``), or an (N, d) array;

floats in [0, 1] or integers 0-255, white strokes on black as in the MNIST files. Inputs
become the model's kind: a grayscale model takes colour as luminance, a colour model
repeats a gray image's channel. The
output is a DataFrame, one row per input in order: ``score``, ``score_normalized``,
``label`` (1 = anomaly, -1 = not scored), ``top_component``, ``error`` (empty when scored),
then one column per score component - the columns of ``jebm-od score --out``.
"""

from __future__ import annotations

import os

import mlflow
import pandas as pd

READ_PATHS_ENV = "JEBM_OD_READ_PATHS"


class JEBMPyfuncModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from outlier_jebm.checkpoint import load_model
        from outlier_jebm.registry import ARTIFACT_KEY
        from outlier_jebm.scoring import Scorer

        loaded = load_model(Path(context.artifacts[ARTIFACT_KEY]))
        if loaded.calibration is None:
            raise ValueError(f"{loaded.path}: the model has no calibration.json")
        self.scorer = Scorer(loaded)
        self.components = self.scorer.component_names
        # a served model reads `path` rows on its own host; JEBM_OD_READ_PATHS=0 turns that off
        self.read_paths = os.environ.get(READ_PATHS_ENV, "1").strip() != "0"

    # The hint names the usual input. MLflow infers no schema from a DataFrame hint, so the logged
    # signature still rules, and it stops warning about a missing hint. Arrays and dicts work too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import numpy as np

        from outlier_jebm.io.payload import items_from_array, items_from_frame, items_from_vectors, score_items
        from outlier_jebm.schema import output_columns

        size, channels = self.scorer.image_size, self.scorer.channels
        model_cfg = self.scorer.config.model
        if model_cfg.is_vector:  # d numeric columns, or an (N, d) array
            if isinstance(model_input, dict) and len(model_input) == 1:
                model_input = next(iter(model_input.values()))
            if (
                isinstance(model_input, pd.DataFrame)
                and model_input.shape[1] == 1
                and model_input.dtypes.iloc[0].kind == "O"
            ):
                rows = model_input.iloc[:, 0].tolist()  # one column of arrays, as Spark's ``pixels`` column arrives
            elif isinstance(model_input, pd.DataFrame):
                names = self.scorer.feature_names
                given = [str(c) for c in model_input.columns]
                if names and set(names) <= set(given):  # the fitted table's columns, by name, in their order
                    model_input = model_input.set_axis(given, axis=1)[names]
                rows = model_input.to_numpy()
            else:
                rows = np.asarray(model_input)
            items = items_from_vectors(rows, model_cfg.vector_dim, "input")
        elif isinstance(model_input, pd.DataFrame):
            items = items_from_frame(model_input, size, channels, read_paths=self.read_paths)
        elif isinstance(model_input, dict) and len(model_input) == 1:
            items = items_from_array(np.asarray(next(iter(model_input.values()))), size, channels=channels)
        else:
            items = items_from_array(np.asarray(model_input), size, channels=channels)
        table = score_items(self.scorer, items)
        return pd.DataFrame({k: table[k] for k in output_columns(self.components)})


mlflow.models.set_model(JEBMPyfuncModel())
