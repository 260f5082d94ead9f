"""Payment gateways behind one interface (the ledger by default)."""
