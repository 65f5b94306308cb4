"""The Telegram bot: onnxruntime generation engine, chat commands, daily speeches. Never imports torch."""
