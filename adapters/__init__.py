"""Adapters and infrastructure: database, settings, files, mail, label, payments; below the use cases."""
