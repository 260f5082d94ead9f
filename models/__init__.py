"""The returns domain: pure policy, lifecycle and money, plus the SQLModel tables (models.tables)."""
