"""The application layer: configuration, database units of work, documents, mail, and the command line."""
