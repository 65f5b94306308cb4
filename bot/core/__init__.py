"""The transport-free core: commands parsed and answered, chat settings read and written, speeches asked
of the engine. No Telegram, no onnxruntime, no process configuration: Telegram, the console and the tests
all drive it the same way."""
