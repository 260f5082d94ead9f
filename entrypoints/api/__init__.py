"""The storefront API and the shopper's returns pages (one FastAPI app, `create_app`)."""
