"""One module per endpoint family; each `register(app, state, api)` adds its routes."""
