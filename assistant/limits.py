"""Input limits shared by every surface (CLI, app, server); kept free of heavy imports."""

#: longest question accepted, in characters
MAX_QUESTION_CHARS = 4000
#: largest image accepted, in pixels (checked from the header before decoding)
MAX_IMAGE_PIXELS = 64_000_000
