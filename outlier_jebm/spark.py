"""Batch scoring on Spark: the logged MLflow pyfunc model run by ``mlflow.pyfunc.spark_udf``.

``jebm-od score --engine spark INPUT OUTPUT --model ...`` reads a parquet dataset with a
column ``pixels`` (arrays of S*S numbers, or S*S*3 in H, W, C order for a colour model;
floats in [0, 1] or integers 0-255; d numbers for a vector model) or a column ``path`` (image files readable where the
Spark tasks run, read in the model's channels like ``jebm-od score`` reads them), scores
every row with the same pyfunc model that ``mlflow models serve`` answers with, and writes
a parquet dataset: the input columns plus the columns of ``jebm-od score --out``
(``score``, ``score_normalized``, ``label``, ``top_component``, ``error``, one column per
component). A bad row gets its ``error`` and label -1; it never fails the job.

Spark does the scheduling: locally (``local[*]``, the default) or on a cluster
(``--spark-master spark://...``, or launched with ``spark-submit``). Each Python worker loads
the model once and scores Arrow batches of ``--batch-rows`` rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError

INPUT_COLUMNS = ("pixels", "path")
RESULT_FIELD = "_jebm_od_result"


@dataclass
class SparkScoreSummary:
    rows: int
    scored: int
    flagged: int
    errors: list[tuple[str, str]] = field(default_factory=list)  # (row label, reason), the first few
    n_errors: int = 0
    top: list[dict] = field(default_factory=list)  # the most anomalous rows
    output: str = ""
    model_uri: str = ""
    seconds: float = 0.0


def pyfunc_uri_for(model: str | None, workdir: Path) -> str:
    """An MLflow model URI ``spark_udf`` can load: a ``models:/``/``runs:/`` URI as given; a model
    directory (or the last fitted model) is saved as a pyfunc model under ``workdir`` first."""
    from .checkpoint import load_model
    from .modeldirs import resolve_model_dir
    from .registry import is_model_uri, save_pyfunc

    if is_model_uri(model):
        return str(model)
    model_dir = resolve_model_dir(model)
    loaded = load_model(model_dir)
    if loaded.calibration is None:
        raise DataError(f"{model_dir}: the model has no calibration.json (it was not fitted to the end); refit it")
    path = workdir / "pyfunc"
    save_pyfunc(model_dir, path)
    return str(path)


def spark_session(master: str | None = None, app_name: str = "jebm-od score", threads_per_task: int = 1):
    """A Spark session: the one ``spark-submit`` set up, else ``master`` (default ``local[*]``).

    Torch in each Python worker gets ``threads_per_task`` threads (``OMP_NUM_THREADS``), so that
    one worker per core does not oversubscribe the machine.
    """
    from pyspark.sql import SparkSession

    launched_by_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_task))
    if not launched_by_submit and (master or "local").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode: nothing listens beyond loopback
    builder = SparkSession.builder.appName(app_name)
    if master or not launched_by_submit:
        builder = builder.master(master or "local[*]")
    builder = (
        builder.config("spark.ui.showConsoleProgress", "false")
        .config("spark.executorEnv.OMP_NUM_THREADS", str(threads_per_task))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
    )
    if not launched_by_submit:
        builder = builder.config("spark.ui.enabled", "false")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def score_parquet(
    spark,
    model_uri: str,
    input_path: str,
    output_path: str,
    *,
    overwrite: bool = False,
    batch_rows: int = 2048,
    top: int = 10,
) -> SparkScoreSummary:
    """Score ``input_path`` (parquet) with the pyfunc at ``model_uri``; write ``output_path`` (parquet)."""
    import time

    import mlflow
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, NumericType, StringType

    t0 = time.perf_counter()
    try:
        frame = spark.read.parquet(input_path)
    except AnalysisException as exc:
        raise DataError(f"{input_path}: cannot read it as parquet ({_first_line(exc)})") from None
    columns = frame.columns
    present = [c for c in INPUT_COLUMNS if c in columns]
    if not present:
        raise DataError(
            f"{input_path}: needs a column 'pixels' (flat arrays of pixel values, H, W, C order) or 'path' "
            f"(image files); it has {columns}"
        )
    source = present[0]
    dtype = frame.schema[source].dataType
    if source == "pixels" and not (isinstance(dtype, ArrayType) and isinstance(dtype.elementType, NumericType)):
        raise DataError(f"{input_path}: column 'pixels' must be an array of numbers, not {dtype.simpleString()}")
    if source == "path" and not isinstance(dtype, StringType):
        raise DataError(f"{input_path}: column 'path' must be strings, not {dtype.simpleString()}")

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local")
    out_fields = [f.name for f in udf.returnType.fields] if hasattr(udf, "returnType") else None
    clash = [c for c in (out_fields or []) if c in columns]
    if clash:
        raise DataError(f"{input_path}: input columns {clash} would be overwritten by the score columns; rename them")
    scored = frame.withColumn(RESULT_FIELD, udf(F.struct(F.col(source))))
    scored = scored.select(*[F.col(c) for c in columns], f"{RESULT_FIELD}.*")
    writer = scored.write.mode("overwrite" if overwrite else "errorifexists")
    try:
        writer.parquet(output_path)
    except AnalysisException as exc:
        if "already exists" in str(exc).lower() or "PATH_ALREADY_EXISTS" in str(exc):
            raise DataError(f"{output_path}: already exists (pass --overwrite to replace it)") from None
        raise
    seconds = time.perf_counter() - t0
    others = [c for c in columns if c not in INPUT_COLUMNS]
    return summarize(spark, output_path, source, others[0] if others else None, model_uri, seconds, top=top)


def summarize(
    spark, output_path: str, source: str, id_column: str | None, model_uri: str, seconds: float, top: int = 10
) -> SparkScoreSummary:
    """Counts, the first errors and the top anomalies of a scored dataset; rows are named by their
    ``path``, else by ``id_column`` (e.g. ``id=17``)."""
    from pyspark.sql import functions as F

    result = spark.read.parquet(output_path)
    counts = result.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.when(F.col("error") == "", 1).otherwise(0)).alias("scored"),
        F.sum(F.when(F.col("label") == 1, 1).otherwise(0)).alias("flagged"),
    ).first()
    if source == "path":
        label = F.col("path")
    elif id_column:
        label = F.concat(F.lit(f"{id_column}="), F.col(id_column).cast("string"))
    else:
        label = F.lit(None).cast("string")
    with_id = result.withColumn("_row", label)
    errors = [
        (r["_row"], r["error"])
        for r in with_id.filter(F.col("error") != "").select("_row", "error").limit(50).collect()
    ]
    top_rows = [
        r.asDict()
        for r in with_id.filter(F.col("error") == "")
        .orderBy(F.col("score").desc())
        .select("_row", "score", "score_normalized", "label", "top_component")
        .limit(top)
        .collect()
    ]
    rows = int(counts["rows"] or 0)
    scored = int(counts["scored"] or 0)
    return SparkScoreSummary(
        rows=rows,
        scored=scored,
        flagged=int(counts["flagged"] or 0),
        errors=errors,
        n_errors=rows - scored,
        top=top_rows,
        output=output_path,
        model_uri=model_uri,
        seconds=seconds,
    )


def quiet() -> None:
    """Keep the console readable: no artifact progress bars, no library warnings we cannot act on."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (configures its loggers on import: set our levels after it)

    warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
    logging.getLogger("mlflow").setLevel(logging.ERROR)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
