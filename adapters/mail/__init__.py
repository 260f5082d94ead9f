"""Outbox email: templates, message building, transports."""
