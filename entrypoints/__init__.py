"""Entry points: the command line, the demo, the Prefect server and client; nothing below imports them."""
