"""Providers: `services` holds the rows; each other module speaks one wire protocol."""
