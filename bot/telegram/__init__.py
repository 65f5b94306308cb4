"""The Telegram adapter: python-telegram-bot wired to the core (handlers, sending, drafts, daily posts)."""
