"""The Kedro glue of this project: hooks (pre-run checks, subject locks, MLflow stage runs), the subjects config
loader, the pre-run file checks and the console filter. Nothing below ``pipelines/`` imports it."""
