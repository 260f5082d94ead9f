"""Prefect tasks: one side effect each (a transaction, a PDF, an SMTP batch, a refund call)."""
