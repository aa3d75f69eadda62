"""The front: what a caller talks to. The `Runtime` facade, the dispatcher that routes requests
to the engine side, one `Session` per request, and the text work around them (chat templates,
detokenizing, stop strings, structured-output requests).

The front talks to the engine only through `omlx_actors.engine.messages` and the declared
`EngineSide` interface; import-linter checks that in the test command.
"""
