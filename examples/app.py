"""The example application: one App built from ``config/amqptasks.yaml`` (or $AMQPTASKS_CONFIG)."""

from amqptasks import App

app = App.from_config()
