"""The lookalike web service: a Litestar API over the tables, and the page that browses them."""
