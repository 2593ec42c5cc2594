"""Built-in plugins: registered through the same hooks as outside plugins (see plugins.DEFAULT_PLUGINS)."""
