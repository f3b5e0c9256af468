"""Figures and the report (matplotlib, no Kedro)."""
