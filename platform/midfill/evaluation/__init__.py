"""Infill evaluation: HumanEval-infilling (rebuilt offline), line exact match, left-to-right loss,
a sandbox for executing generated code, and recording results on MLflow model versions."""
