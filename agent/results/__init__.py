"""Results of answered predictions: the SQLite buffer (schema and migrations), the rows
it hands out, and the forwarder that drains it over the link."""
