"""Helpers shared by the tests and the benchmarks: the Telegram Bot API emulator, the harness that runs the
bot against it, a killable bot process, tiny models and fresh databases."""
