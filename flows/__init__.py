"""Prefect flows: orchestration only, one flow per stage entry point."""
